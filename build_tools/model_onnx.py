"""An ONNX classifier as ``--model``: its signature checked (one float32 NCHW input, one 2-D float32 output),
normalised for the build (input ``input``, output ``logits``, dynamic batch axis, ONNX Runtime's basic graph
optimizations) and run at batch 2 to prove the batch axis is dynamic.

Every refusal is a :class:`~tcsched.build_tools.model_spec.ModelSourceError` naming what was wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tcsched.build_tools.model_spec import ModelSourceError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def _dims(value_info) -> list[int | str | None]:
    t = value_info.type.tensor_type
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def check_onnx_signature(model) -> tuple[list, list]:
    """(input dims, output dims) of an ONNX classifier, or the reason it is not one.

    Raises:
        ModelSourceError: not exactly one graph input and one output, an input that is not float32 [N, C, H, W],
            an output that is not float32 [N, classes].
    """
    import onnx

    g = model.graph
    inits = {i.name for i in g.initializer}
    inputs = [i for i in g.input if i.name not in inits]
    if len(inputs) != 1 or len(g.output) != 1:
        raise ModelSourceError(
            f"the ONNX graph has {len(inputs)} input(s) {[i.name for i in inputs]} and {len(g.output)} output(s) "
            f"{[o.name for o in g.output]}; expected one image input and one logits output"
        )
    (inp,), (out,) = inputs, g.output
    for what, vi, rank, form in (
        ("input", inp, 4, "[N, C, H, W] (NCHW image)"),
        ("output", out, 2, "[N, classes] (logits)"),
    ):
        et = vi.type.tensor_type.elem_type
        dims = _dims(vi)
        if et != onnx.TensorProto.FLOAT or len(dims) != rank:
            raise ModelSourceError(
                f"the ONNX {what} {vi.name!r} is {onnx.helper.tensor_dtype_to_np_dtype(et) if et else 'untyped'} "
                f"{dims} ({len(dims)}-D); expected float32 {form}"
            )
    return _dims(inp), _dims(out)


def _make_batch_dynamic(model) -> bool:
    """Set dim 0 of the input and the output to the symbol ``batch`` where it is a fixed number; True if so."""
    changed = False
    g = model.graph
    inits = {i.name for i in g.initializer}
    for vi in [i for i in g.input if i.name not in inits] + list(g.output):
        d = vi.type.tensor_type.shape.dim[0]
        if d.HasField("dim_value"):
            d.Clear()
            d.dim_param = "batch"
            changed = True
    return changed


def _rename(model, old: str, new: str) -> None:
    if old == new:
        return
    g = model.graph
    for vi in list(g.input) + list(g.output):
        if vi.name == old:
            vi.name = new
    for n in g.node:
        for seq in (n.input, n.output):
            for i, x in enumerate(seq):
                if x == old:
                    seq[i] = new


def optimize_basic(model):
    """ONNX Runtime's basic graph optimizations (constant folding, redundant-node elimination, Pad/BN/Add
    folded into Conv: standard ONNX ops only), then ``Reshape(x, [0, -1])`` of a 4-D tensor as
    ``Flatten(axis=1)`` (ONNX Reshape: 0 copies that input dimension, so both give [N, C*H*W]); opset imports
    reduced to the domains the graph uses. The exported graphs of ``torch.nn.ZeroPad2d`` and of
    ``x.view(x.size(0), -1)`` become the Conv/Flatten form the build's quantizer, fine-tune and analysis
    know."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in.onnx", Path(d) / "out.onnx"
        onnx.save(model, str(src))
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = str(dst)
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        out = onnx.load(str(dst))
    g = out.graph
    consts = {i.name: i for i in g.initializer}
    shapes = {vi.name: vi for vi in list(g.value_info) + list(g.input)}
    inferred = onnx.shape_inference.infer_shapes(out)
    shapes.update({vi.name: vi for vi in inferred.graph.value_info})
    for n in g.node:
        if n.op_type != "Reshape" or n.input[1] not in consts:
            continue
        target = onnx.numpy_helper.to_array(consts[n.input[1]]).tolist()
        src_vi = shapes.get(n.input[0])
        if target == [0, -1] and src_vi is not None and len(_dims(src_vi)) == 4:
            n.op_type = "Flatten"
            del n.input[1:]
            del n.attribute[:]
            n.attribute.append(onnx.helper.make_attribute("axis", 1))
    used = {i for n in g.node for i in n.input}
    for name in [k for k in consts if k not in used]:
        g.initializer.remove(consts[name])
    domains = {n.domain or "" for n in g.node}
    keep = [o for o in out.opset_import if (o.domain or "") in domains or o.domain in ("", "ai.onnx")]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    onnx.checker.check_model(out)
    return out


def load_onnx_classifier(path: Path):
    """An ONNX classifier normalised for the build: checked (:func:`check_onnx_signature`), batch axis
    dynamic, input renamed ``input`` and output ``logits``, :func:`optimize_basic`, and run by ONNX Runtime at
    batch 2. Returns (model, [C, H or None, W or None], classes or None, notes).

    Raises:
        ModelSourceError: unreadable, the signature, or a graph whose batch axis cannot be made dynamic (it
            fails or returns another batch at batch 2: a Reshape or an initializer fixes it).
    """
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ModelSourceError(f"--model {path}: not an ONNX model ({type(e).__name__}: {e})") from None
    in_dims, out_dims = check_onnx_signature(model)
    notes = []
    if _make_batch_dynamic(model):
        notes.append(f"batch axis of {path.name} was fixed ({in_dims[0]}): made dynamic")
    g = model.graph
    inits = {i.name for i in g.initializer}
    (inp,) = [i for i in g.input if i.name not in inits]
    _rename(model, inp.name, INPUT_NAME)
    _rename(model, g.output[0].name, OUTPUT_NAME)
    try:
        model = optimize_basic(model)
    except Exception as e:  # noqa: BLE001 - ONNX Runtime refuses the graph: say so
        raise ModelSourceError(
            f"--model {path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:300]})"
        ) from None
    c, h, w = (d if isinstance(d, int) and d > 0 else None for d in in_dims[1:])
    if c is None:
        raise ModelSourceError(
            f"--model {path}: the input's channel axis is {in_dims[1]!r}; expected a fixed number"
        )
    classes = out_dims[1] if isinstance(out_dims[1], int) and out_dims[1] > 0 else None
    return model, [c, h, w], classes, notes


def run_batch2(model, chw: tuple[int, int, int], path: Path) -> int:
    """Run the normalised graph at batch 2; its number of classes.

    Raises:
        ModelSourceError: it fails, or the output is not [2, classes].
    """
    import onnxruntime as ort

    try:
        s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        (y,) = s.run(None, {INPUT_NAME: np.zeros((2, *chw), np.float32)})
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's errors are one class per kind
        raise ModelSourceError(
            f"--model {path}: the graph does not run at batch 2 ({str(e).splitlines()[0][:300]}); its batch "
            "axis cannot be made dynamic (a Reshape or a constant fixes it): export it with a dynamic batch axis"
        ) from None
    if y.ndim != 2 or y.shape[0] != 2:
        raise ModelSourceError(
            f"--model {path}: at batch 2 the output is {list(y.shape)}; expected [2, classes] (the batch axis "
            "cannot be made dynamic: export it with a dynamic batch axis)"
        )
    return int(y.shape[1])


def fix_spatial(model, crop: tuple[int, int]) -> None:
    d = model.graph.input[0].type.tensor_type.shape.dim
    for i, v in ((2, crop[0]), (3, crop[1])):
        d[i].Clear()
        d[i].dim_value = int(v)
