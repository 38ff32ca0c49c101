"""``analyze()``: load and check the graph, take the activation ranges, probe every layer, apply the rules, and
assemble the :class:`~tcsched.build_tools.analysis.schema.AnalysisReport`."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console

from tcsched.build_tools.analysis.geometry import (
    LayerGeometry,
    inferred_shapes,
    layer_geometries,
    layer_macs,
    tensor_dims,
)
from tcsched.build_tools.analysis.probes import (
    Calibration,
    ProbeResult,
    calibration_feeds,
    fp32_pass,
    probe_layer,
)
from tcsched.build_tools.analysis.rules import run_rules
from tcsched.build_tools.analysis.schema import AnalysisReport, AnalysisTotals, LayerReport, verdict_model
from tcsched.build_tools.analysis.weights import (
    absmax_per_channel,
    can_prune_2_4,
    is_2to4,
    sparse_view,
    weight_sparsity,
)

if TYPE_CHECKING:  # pragma: no cover
    import onnx

MIN_OPSET = 13
"""Per-axis DequantizeLinear (the per-channel weights of the probes) needs opset 13 (ONNX operator docs)."""


@dataclass(frozen=True)
class _Graph:
    """A loaded, checked model: the proto, its one input and its Conv/Gemm layers."""

    path: Path
    model: onnx.ModelProto
    input_name: str
    input_shape: list[int | str]
    layers: list[LayerGeometry]


def _load(path: Path) -> _Graph:
    """Load ``path`` and check what :func:`analyze` needs (see its Raises)."""
    import onnx

    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {path}")
    model = onnx.load(str(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ValueError(f"{path}: opset {opset} < {MIN_OPSET} (per-axis DequantizeLinear needs {MIN_OPSET})")
    inits = {i.name for i in model.graph.initializer}
    real_inputs = [i for i in model.graph.input if i.name not in inits]
    if len(real_inputs) != 1:
        raise ValueError(f"{path}: expected one input, got {[i.name for i in real_inputs]}")
    geos = layer_geometries(model)
    if not geos:
        raise ValueError(f"{path}: no Conv/Gemm layer to analyse")
    return _Graph(path, model, real_inputs[0].name, tensor_dims(real_inputs[0].type) or [], geos)


def _weights(graph: _Graph) -> dict[str, np.ndarray]:
    """Every layer's weight and bias initializer as float32."""
    from onnx import numpy_helper

    wanted = {g.weight_name for g in graph.layers} | {g.bias_name for g in graph.layers if g.bias_name}
    return {
        i.name: numpy_helper.to_array(i).astype(np.float32, copy=False)
        for i in graph.model.graph.initializer
        if i.name in wanted
    }


def _output_shape(inferred: list[int | str], observed: list[int]) -> list[int | str]:
    """Shape inference's shape (symbolic batch); the shape seen at run time where it left a dimension unknown."""
    if len(inferred) != len(observed) or any(not isinstance(d, int) for d in inferred[1:]):
        return [inferred[0] if inferred and isinstance(inferred[0], str) else "N", *observed[1:]]
    return list(inferred)


def layer_report(
    index: int,
    g: LayerGeometry,
    weights: Mapping[str, np.ndarray],
    input_range: tuple[float, float],
    inferred_shape: list[int | str],
    probe: ProbeResult,
) -> LayerReport:
    """One layer's report: its geometry, weight statistics, every rule's verdict and its probe's measurements."""
    w = weights[g.weight_name]
    out_shape = _output_shape(inferred_shape, probe.observed_shape)
    absmax = absmax_per_channel(w, g.weight_channel_axis)
    bias_n = weights[g.bias_name].size if g.bias_name in weights else 0
    verdicts = {field: verdict_model(v) for field, v in run_rules(g).items()}
    return LayerReport(
        index=index,
        name=g.name,
        op_type=g.op_type,  # type: ignore[arg-type]
        kind=g.kind,
        input_name=g.input_name,
        output_name=g.output_name,
        weight_name=g.weight_name,
        weight_shape=list(g.weight_shape),
        in_channels=g.in_channels,
        out_channels=g.out_channels,
        groups=g.group,
        kernel=list(g.kernel),
        stride=list(g.stride),
        output_shape=out_shape,
        macs=layer_macs(g, out_shape),
        params=int(w.size + bias_n),
        weight_absmax_per_channel_min=float(absmax.min()),
        weight_absmax_per_channel_max=float(absmax.max()),
        input_activation_min=input_range[0],
        input_activation_max=input_range[1],
        sparsity=weight_sparsity(w),
        is_2to4_sparse=is_2to4(sparse_view(w, g)),
        int8_sensitivity=probe.int8,
        prune24_sqnr_db=probe.prune24_sqnr_db,
        **verdicts,
    )


def _progress(console: Console, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console, disable=not enabled, transient=False)


def analyze(
    onnx_path: str | os.PathLike,
    calibration: Calibration,
    *,
    progress: bool = True,
    batch_size: int = 8,
    threads: int = 2,
    console: Console | None = None,
) -> AnalysisReport:
    """Analyse every Conv/Gemm of an ONNX classifier (see :mod:`tcsched.build_tools.analysis` for what is
    measured).

    Args:
        onnx_path: fp32 ONNX graph with one input (float32 [N, C, H, W]) whose first output is the logits
            [N, classes]; opset >= 13 (per-axis DequantizeLinear).
        calibration: float32 array [N, C, H, W] of preprocessed images, or an iterable of ONNX Runtime feed dicts
            ``{input_name: float32 [n, C, H, W]}``. Used both for the activation ranges and for the errors.
        progress: show a rich progress bar.
        batch_size: images per ``session.run`` (a static batch in the model wins).
        threads: ONNX Runtime intra-op threads.
        console: where the progress goes.

    Returns:
        The :class:`AnalysisReport` (not written; see :meth:`AnalysisReport.write`).

    Raises:
        FileNotFoundError: no file at ``onnx_path``.
        ValueError: before any inference: bad ``batch_size``/``threads``, a model with != 1 input, opset < 13,
            no Conv/Gemm, a weight that is not an initializer, or calibration data of the wrong dtype/shape.
    """
    import onnxruntime as ort

    t0 = time.perf_counter()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    graph = _load(Path(onnx_path))
    feeds = calibration_feeds(calibration, graph.input_name, graph.input_shape, batch_size)
    shapes = inferred_shapes(graph.model)
    weights = _weights(graph)
    layers: list[LayerReport] = []
    with (
        tempfile.TemporaryDirectory(prefix="tcsched-analysis-") as tmp,
        _progress(console or Console(stderr=True), progress) as bar,
    ):
        workdir = Path(tmp)
        t_ranges = bar.add_task("fp32 pass: activation ranges", total=len(feeds))
        ref_logits, ranges = fp32_pass(
            graph.model, graph.layers, feeds, threads, workdir, on_batch=lambda: bar.advance(t_ranges)
        )
        t_layers = bar.add_task("per-layer INT8 / 2:4 probes", total=len(graph.layers))
        for i, g in enumerate(graph.layers):
            bar.update(t_layers, description=f"probe {g.name[-48:]}")
            w, rng = weights[g.weight_name], ranges[g.input_name]
            probe = probe_layer(
                graph.model, g, w, rng, can_prune_2_4(w, g), feeds, ref_logits, threads, workdir
            )
            layers.append(layer_report(i, g, weights, rng, list(shapes.get(g.output_name, [])), probe))
            bar.advance(t_layers)
        bar.update(t_layers, description="per-layer INT8 / 2:4 probes")
    return AnalysisReport(
        model_path=str(graph.path),
        input_name=graph.input_name,
        input_shape=graph.input_shape,
        n_calibration_images=sum(len(f[graph.input_name]) for f in feeds),
        onnxruntime_version=ort.__version__,
        threads=threads,
        wall_time_s=time.perf_counter() - t0,
        layers=layers,
        totals=AnalysisTotals.of(layers),
    )
