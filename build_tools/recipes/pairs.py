"""(runtime, graph) pairs: every built graph runs on ONNX Runtime; some also on OpenVINO.

A recipe makes a graph; a pair is that graph on one runtime, measured and listed as its own variant (Triton
model ``mobilenet_v2_<precision>_openvino``). OpenVINO runs the graphs whose kind it compiles natively on a CPU
(OpenVINO's CPU device documentation, "Supported inference data types": f32, bf16, i8 with the Q/DQ pattern):

- ``fp32`` -> ``bf16`` (``INFERENCE_PRECISION_HINT=bf16``) where the CPU runs bf16 natively
  (:func:`tcsched.engines.capabilities.native_bf16`), else ``fp32`` (hint ``f32``);
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

OPENVINO = "openvino"
ONNXRUNTIME = "onnxruntime"
# graph (recipe name) -> OpenVINO pair's precision; fp32 becomes bf16 only on a native-bf16 CPU
OPENVINO_GRAPHS = {"fp32": "bf16", "int8": "int8", "int8_mixed": "int8_mixed"}
# precisions only a pair has (no recipe makes a graph of them: the runtime computes the graph in it)
PAIR_ONLY_PRECISIONS = ("bf16",)


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
    built: Mapping[str, BuiltVariant], caps: CpuCapabilities, openvino_available: bool
) -> tuple[list[Pair], list[str]]:
    """The OpenVINO pairs of the ``built`` graphs on a CPU with ``caps``, and notes on what was left out.

    Without openvino installed there are none (the note says how to install it)."""
    if not openvino_available:
        from tcsched.engines.openvino import INSTALL_HINT

        return [], [f"OpenVINO pairs not built: openvino is not installed ({INSTALL_HINT})"]
    pairs, notes = [], []
    for graph, precision in OPENVINO_GRAPHS.items():
        v = built.get(graph)
        if v is None:
            continue
        requires: tuple[str, ...] = ()
        if precision == "bf16":
            if caps.native_bf16:
                requires = (BF16,)
            else:
                precision = "fp32"
                notes.append(
                    f"OpenVINO runs {graph} in fp32, not bf16: this CPU has no native bf16 ({caps.summary()})"
                )
        plan = {k: ("bf16" if requires and p == "fp32" else p) for k, p in v.layer_plan.items()}
        how = f"the {graph} graph on OpenVINO, INFERENCE_PRECISION_HINT=" + (
            "bf16 (native on this CPU: " + caps.summary() + ")" if requires else "f32"
        )
        pv = dataclasses.replace(
            v,
            name=pair_name(precision, OPENVINO),
            precision=precision,
            layer_plan=plan,
            notes=[how, *v.notes],
            served_on_cpu_for_speed=True,
        )
        pairs.append(Pair(pv, OPENVINO, requires))
    return pairs, notes
