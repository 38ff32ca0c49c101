"""What TensorRT makes of a graph, read without a GPU: the Q/DQ nodes its ONNX parser rejects
(:func:`tensorrt_qdq_problems`) and the layers of a built engine as its engine inspector lists them
(:func:`engine_layers`, :func:`int8_layers`, :func:`sparse_layers`; the JSON format is described in
:mod:`tcsched.build_tools.tensorrt_engine`). Re-exported by :mod:`tcsched.build_tools.tensorrt_engine`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

# ------------------------------------------------------------------------------------------------ Q/DQ checks
# ONNX TensorProto element types TensorRT's Q/DQ accept: INT8, INT4, and the FP8/FP4 types (symmetric only)
_TRT_QDQ_TYPES = {
    3: "INT8",
    17: "FLOAT8E4M3FN",
    18: "FLOAT8E4M3FNUZ",
    19: "FLOAT8E5M2",
    20: "FLOAT8E5M2FNUZ",
    22: "INT4",
    23: "FLOAT4E2M1",
}


def _constants(graph) -> dict:
    consts = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value":
                    consts[node.output[0]] = a.t
    return consts


def tensorrt_qdq_problems(onnx_path: str | os.PathLike) -> list[str]:
    """Q/DQ nodes of an ONNX graph that TensorRT's parser rejects, one message each (empty: none).

    TensorRT quantizes symmetrically only: every ``QuantizeLinear``/``DequantizeLinear`` zero point must be
    all zeros, of a signed type (INT8, INT4, FP8). ONNX Runtime's default static quantization (uint8
    activations, asymmetric) violates both; :mod:`tcsched.build_tools.tensorrt_graph` re-expresses such graphs.
    Runs on CPU (onnx only), so a bad variant is refused before any GPU work.

    Raises:
        ValueError: ``onnx_path`` does not exist.
    """
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ValueError(f"ONNX file {onnx_path} does not exist")
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    consts = _constants(graph)
    problems = []
    for node in graph.node:
        if (
            node.op_type not in ("QuantizeLinear", "DequantizeLinear")
            or len(node.input) < 3
            or not node.input[2]
        ):
            continue
        zp = consts.get(node.input[2])
        if zp is None:
            problems.append(f"{node.op_type} {node.name!r}: zero point {node.input[2]!r} is not a constant")
        elif zp.data_type not in _TRT_QDQ_TYPES:
            kind = onnx.TensorProto.DataType.Name(zp.data_type)
            problems.append(f"{node.op_type} {node.name!r}: {kind} zero point (TensorRT: INT8/INT4/FP8 only)")
        elif zp.data_type in (3, 22) and numpy_helper.to_array(zp).any():
            problems.append(f"{node.op_type} {node.name!r}: non-zero zero point (TensorRT: symmetric only)")
    return problems


# ------------------------------------------------------------------------------------------ engine inspector
# "Int8" in a layer's I/O "Format/Datatype" (e.g. "Thirty-two wide channel vectorized row major Int8 format"),
# not "UInt8" (trex/activations.py, v10.13.3, lists both spellings)
_INT8_FORMAT = re.compile(r"(?<![a-z])int8(?![a-z0-9])", re.IGNORECASE)


def engine_layers(info_json: str) -> list[dict]:
    """The layers of ``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)``: ``{"Layers": [...]}``.

    Raises:
        ValueError: not that JSON, or its layers are bare names (the engine was built without
            ``ProfilingVerbosity.DETAILED``, so formats, tactics and sparsity are not recorded).
    """
    try:
        data = json.loads(info_json)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"engine information is not JSON: {e}") from None
    layers = data.get("Layers") if isinstance(data, dict) else None
    if not isinstance(layers, list) or not layers:
        raise ValueError("engine information has no 'Layers' list")
    if not all(isinstance(layer, dict) for layer in layers):
        raise ValueError("engine information holds layer names only: build with ProfilingVerbosity.DETAILED")
    return layers


def _formats(layer: dict) -> list[str]:
    return [
        str(t.get("Format/Datatype", ""))
        for key in ("Inputs", "Outputs")
        for t in layer.get(key, [])
        if isinstance(t, dict)
    ]


def int8_layers(layers: Sequence[dict]) -> list[str]:
    """Names of the compute layers with an INT8 input or output (``Reformat`` layers, TensorRT's stand-alone
    Q/DQ and layout converters, do not count)."""
    return [
        str(layer.get("Name", "?"))
        for layer in layers
        if layer.get("LayerType") != "Reformat" and any(_INT8_FORMAT.search(f) for f in _formats(layer))
    ]


def sparse_layers(layers: Sequence[dict]) -> list[str] | None:
    """Names of the layers that run 2:4 sparse kernels: a true ``*HasSparseWeights`` field or a tactic name with
    ``sparse`` in it. ``None`` when no layer carries either field, i.e. the inspector does not say (another
    TensorRT's format): the caller must then not read "no sparse kernel" into it."""
    told = False
    names = []
    for layer in layers:
        flags = [v for k, v in layer.items() if k.endswith("HasSparseWeights")]
        tactic = layer.get("TacticName")
        told = told or bool(flags) or isinstance(tactic, str)
        if any(bool(v) for v in flags) or (isinstance(tactic, str) and "sparse" in tactic.lower()):
            names.append(str(layer.get("Name", "?")))
    return names if told else None
