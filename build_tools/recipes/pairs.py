"""(runtime, graph) pairs: every built graph runs on ONNX Runtime; some also on OpenVINO.

A recipe makes a graph; a pair is that graph on one runtime, measured and listed as its own variant (Triton
model ``mobilenet_v2_<precision>_openvino``). OpenVINO runs the graphs whose kind it compiles natively on a CPU
(OpenVINO's CPU device documentation, "Supported inference data types": f32, bf16, i8 with the Q/DQ pattern):

- ``fp32`` -> ``bf16`` (``INFERENCE_PRECISION_HINT=bf16``) and ``bf16_mixed`` (bf16 with the network's stem in
  f32: :data:`tcsched.engines.openvino.F32_STEM_CONVOLUTIONS`, where whole-graph bf16 loses agreement) where the
  CPU runs bf16 natively (:func:`tcsched.engines.capabilities.native_bf16`), else ``fp32`` (hint ``f32``);
- ``int8`` and ``int8_mixed`` (Q/DQ graphs) -> the same precision, float layers in f32.

The fp16 graph (Cast nodes, emulated on CPUs) and ``sparse24`` (2:4 is a GPU format) are left to ONNX Runtime.
The ONNX Runtime fp32 graph stays the reference of every figure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from tcsched.build_tools.recipes.base import BuiltVariant
from tcsched.engines.capabilities import BF16, CpuCapabilities
from tcsched.engines.openvino import BF16_PRECISIONS, F32_STEM_CONVOLUTIONS

OPENVINO = "openvino"
ONNXRUNTIME = "onnxruntime"
# graph (recipe name) -> OpenVINO pairs' precisions; fp32 becomes bf16 only on a native-bf16 CPU
OPENVINO_GRAPHS = {"fp32": ("bf16", "bf16_mixed"), "int8": ("int8",), "int8_mixed": ("int8_mixed",)}
# precisions only a pair has (no recipe makes a graph of them: the runtime computes the graph in it)
PAIR_ONLY_PRECISIONS = ("bf16", "bf16_mixed")


@dataclass(frozen=True)
class Pair:
    """One graph on one runtime: ``variant`` (the graph, renamed and re-precisioned for the pair),
    ``runtime``, ``requires_cpu`` (capability names it runs natively only with)."""

    variant: BuiltVariant
    runtime: str
    requires_cpu: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.variant.name


def pair_name(precision: str, runtime: str) -> str:
    """The variant name of a pair: the precision, suffixed with the runtime unless it is ONNX Runtime."""
    return precision if runtime == ONNXRUNTIME else f"{precision}_{runtime}"


def openvino_pairs(
    built: Mapping[str, BuiltVariant],
    caps: CpuCapabilities,
    openvino_available: bool,
    two_model_variants: bool = True,
) -> tuple[list[Pair], list[str]]:
    """The OpenVINO pairs of the ``built`` graphs on a CPU with ``caps``, and notes on what was left out.

    Without openvino installed there are none (the note says how to install it). ``two_model_variants``: whether
    the serving backend runs one variant as two compiled models (``bf16_mixed``): the Python backend's engine
    does, Triton's openvino backend (one model file per model) does not, so without it ``bf16_mixed`` is left
    out."""
    if not openvino_available:
        from tcsched.engines.openvino import INSTALL_HINT

        return [], [f"OpenVINO pairs not built: openvino is not installed ({INSTALL_HINT})"]
    pairs, notes = [], []
    for graph, precisions in OPENVINO_GRAPHS.items():
        v = built.get(graph)
        if v is None:
            continue
        if not caps.native_bf16 and any(p in BF16_PRECISIONS for p in precisions):
            precisions = ("fp32",)
            notes.append(
                f"OpenVINO runs {graph} in fp32, not bf16: this CPU has no native bf16 ({caps.summary()})"
            )
        for precision in precisions:
            if precision == "bf16_mixed":
                why = (
                    "Triton's openvino backend runs one compiled model"
                    if not two_model_variants
                    else _no_stem_cut(v.path)
                )
                if why:
                    notes.append(f"bf16_mixed_openvino not built: {why}")
                    continue
            pairs.append(_pair(v, graph, precision, caps))
    return pairs, notes


def _no_stem_cut(path) -> str | None:
    """Why the graph at ``path`` has no f32 stem for ``bf16_mixed`` (:func:`tcsched.engines.openvino.stem_cut`),
    or ``None`` when it has one."""
    from tcsched.engines.openvino import import_openvino, stem_cut

    try:
        stem_cut(import_openvino().Core().read_model(str(path)))
    except ValueError as e:
        return str(e)
    return None


def _pair(v: BuiltVariant, graph: str, precision: str, caps: CpuCapabilities) -> Pair:
    """The pair of graph ``v`` on OpenVINO computing in ``precision``: its layer plan (bf16 for the float
    layers of a bf16 pair, except the f32 stem of ``bf16_mixed``), notes and CPU requirement."""
    requires = (BF16,) if precision in BF16_PRECISIONS else ()  # the engine's own bf16 gate
    stem = F32_STEM_CONVOLUTIONS if precision == "bf16_mixed" else 0
    plan = {}
    for k, p in v.layer_plan.items():  # graph order: the first ``stem`` layers are the stem's convolutions
        plan[k] = "bf16" if requires and p == "fp32" and len(plan) >= stem else p
    how = f"the {graph} graph on OpenVINO, INFERENCE_PRECISION_HINT=" + (
        "bf16 (native on this CPU: " + caps.summary() + ")" if requires else "f32"
    )
    if stem:
        how += f"; its first {stem} convolutions (the stem) in f32, as a model of their own"
    pv = dataclasses.replace(
        v,
        name=pair_name(precision, OPENVINO),
        precision=precision,
        layer_plan=plan,
        notes=[how, *v.notes],
        served_on_cpu_for_speed=True,
    )
    return Pair(pv, OPENVINO, requires)
