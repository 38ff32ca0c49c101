"""Quantization-aware fine-tune of a QDQ graph by distillation from the fp32 model (strategy decision, int8).

Post-training quantization rounds every weight to the nearest step. The nearest step is not the best one for the
network's output: choosing the rounding with the output in view recovers most of what per-channel int8 loses
(Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization", arXiv:2004.10568). Here the
choice is learned end to end: the QDQ graph runs in torch with its Q/DQ pairs as fake quantization
(straight-through estimator, Bengio et al. 2013, arXiv:1308.3432), the float weights and biases behind each
weight DequantizeLinear are trained to match the fp32 logits (KL at temperature T, Hinton et al. 2015,
arXiv:1503.02531), and the result is rounded back into the same initializers.

Every scale and zero point stays as calibrated, and no node is added or removed: the fine-tuned graph has the same
structure, so the same ONNX Runtime kernels and the same latency; only int8 weight and int32 bias values change.
Supported ops: QuantizeLinear, DequantizeLinear, Conv, Gemm, Add, Relu, Clip, GlobalAveragePool, Flatten. An
unsupported op raises ValueError before any training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from tcsched.build_tools.quantize import REDUCED_WEIGHT_MAX, depthwise_weights, int8_weight_bits

SUPPORTED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "Conv",
    "Gemm",
    "Add",
    "Relu",
    "Clip",
    "GlobalAveragePool",
    "Flatten",
}
_QRANGE = {
    onnx.TensorProto.UINT8: (0, 255),
    onnx.TensorProto.INT8: (-128, 127),
    onnx.TensorProto.INT32: (-(2**31), 2**31 - 1),
}


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@dataclass
class _WeightSlot:
    """A trainable float tensor behind one initializer DequantizeLinear (a Conv/Gemm weight or bias)."""

    init_name: str  # the int8 / int32 initializer
    scale: np.ndarray  # reshaped to broadcast against the tensor (per channel along the DQ's axis)
    zero_point: np.ndarray  # same shape as ``scale``
    qtype: int  # onnx.TensorProto data type of the initializer


class QDQTorchGraph:
    """A QDQ ONNX classifier graph run in torch, with trainable weights and biases behind its weight DQs.

    ``forward(x)``: float32 [N, C, H, W] -> the graph's first output. Activation Q/DQ pairs are fake quantization
    with the graph's scale and zero point; weights are fake-quantized per channel with the graph's scales.

    Raises:
        ValueError: the graph has an op outside :data:`SUPPORTED_OPS`, or more than one input.
    """

    def __init__(self, model: onnx.ModelProto):
        import torch

        g = model.graph
        bad = sorted({n.op_type for n in g.node} - SUPPORTED_OPS)
        if bad:
            raise ValueError(f"cannot fine-tune a graph with op(s) {bad}; supported: {sorted(SUPPORTED_OPS)}")
        inits = {i.name: i for i in g.initializer}
        graph_inputs = [i.name for i in g.input if i.name not in inits]
        if len(graph_inputs) != 1:
            raise ValueError(f"expected one graph input, got {graph_inputs}")
        self.model = model
        self.input_name = graph_inputs[0]
        self.output_name = g.output[0].name
        self.nodes = list(g.node)
        self._node_attrs = [_attrs(n) for n in self.nodes]  # read once, not on every forward
        self.const = {}  # name -> torch tensor (the float initializers)
        self.params = {}  # DQ output name -> torch Parameter (float weight / bias)
        self.slots: dict[str, _WeightSlot] = {}
        for name, t in inits.items():
            if t.data_type in (onnx.TensorProto.FLOAT,):
                self.const[name] = torch.from_numpy(numpy_helper.to_array(t).copy())
        for n in self.nodes:
            if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
                continue
            q = inits[n.input[0]]
            scale = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
            zp = (
                numpy_helper.to_array(inits[n.input[2]]).astype(np.int64)
                if len(n.input) > 2 and n.input[2]
                else np.zeros_like(scale, dtype=np.int64)
            )
            axis = int(_attrs(n).get("axis", 1))
            w = numpy_helper.to_array(q).astype(np.float32)
            shape = [1] * w.ndim
            if scale.ndim == 1 and scale.size > 1 and w.ndim > 0:  # per-axis; a one-element scale broadcasts
                shape[axis] = -1
            # int8 weights are trained in units of their own quantization step (w = v * scale), so one learning
            # rate moves every channel by the same fraction of a step (cf. LSQ, Esser et al. 2020,
            # arXiv:1902.08153); int32 biases in real units (their step, s_in * s_w, is ~1e-6)
            scale, zp = scale.reshape(shape), zp.reshape(shape)
            v = w - zp
            if q.data_type == onnx.TensorProto.INT32:
                v = v * scale
            self.params[n.output[0]] = torch.nn.Parameter(torch.from_numpy(v.astype(np.float32)))
            self.slots[n.output[0]] = _WeightSlot(q.name, scale, zp, q.data_type)
        # activation QuantizeLinear nodes: (scale, zero point, qmin, qmax), per-tensor
        self.q_params = {}
        for n in self.nodes:
            if n.op_type == "QuantizeLinear":
                zp_t = inits[n.input[2]]
                self.q_params[n.output[0]] = (
                    float(numpy_helper.to_array(inits[n.input[1]])),
                    int(numpy_helper.to_array(zp_t)),
                    *_QRANGE[zp_t.data_type],
                )
        # integer range of each trained initializer: a graph with 7-bit weights (reduce_range, for CPUs without
        # VNNI) stays 7-bit, its depthwise weights 8-bit (tcsched.build_tools.quantize.depthwise_weights)
        seven, dw = int8_weight_bits(self.model) == 7, depthwise_weights(self.model)
        self.qrange = {
            k: (-REDUCED_WEIGHT_MAX, REDUCED_WEIGHT_MAX)
            if seven and s.qtype == onnx.TensorProto.INT8 and s.init_name not in dw
            else _QRANGE[s.qtype]
            for k, s in self.slots.items()
        }
        self._scale_t = {k: torch.from_numpy(s.scale) for k, s in self.slots.items()}
        self._zp_t = {k: torch.from_numpy(s.zero_point.astype(np.int32)) for k, s in self.slots.items()}

    def parameters(self) -> list:
        return list(self.params.values())

    def weight_parameters(self) -> list:
        """The int8 weights, in units of their quantization step."""
        return [p for k, p in self.params.items() if self.slots[k].qtype != onnx.TensorProto.INT32]

    def bias_parameters(self) -> list:
        """The int32 biases, in real units."""
        return [p for k, p in self.params.items() if self.slots[k].qtype == onnx.TensorProto.INT32]

    def _fake_weight(self, key: str):
        import torch

        s = self.slots[key]
        v = self.params[key]
        if s.qtype == onnx.TensorProto.INT32:  # bias: its rounding error is negligible, train it as float
            return v
        lo, hi = self.qrange[key]
        zp = self._zp_t[key]
        # round with a straight-through gradient, clamp to the integer range (no gradient outside it)
        v_int = torch.clamp(v + (torch.round(v) - v).detach(), lo - zp, hi - zp)
        return v_int * self._scale_t[key]

    def _value(self, name: str, env: dict):
        if name in env:
            return env[name]
        if name in self.params:
            env[name] = self._fake_weight(name)
            return env[name]
        return self.const[name]

    def forward(self, x):
        import torch
        import torch.nn.functional as F

        env = {self.input_name: x}
        for n, a in zip(self.nodes, self._node_attrs, strict=True):
            op = n.op_type
            if op == "DequantizeLinear":
                if n.output[0] in self.params:
                    continue  # produced on first use
                env[n.output[0]] = self._value(n.input[0], env)  # Q already fake-quantized the activation
                continue
            if op == "QuantizeLinear":
                env[n.output[0]] = torch.fake_quantize_per_tensor_affine(
                    self._value(n.input[0], env), *self.q_params[n.output[0]]
                )
                continue
            ins = [self._value(i, env) if i else None for i in n.input]
            if op == "Conv":
                pads = list(a.get("pads", [0, 0, 0, 0]))
                xin = ins[0]
                if (
                    pads[:2] != pads[2:]
                ):  # ONNX [top, left, bottom, right]; F.pad takes (left, right, top, bottom)
                    xin = F.pad(xin, (pads[1], pads[3], pads[0], pads[2]))
                    pads = [0, 0, 0, 0]
                y = F.conv2d(
                    xin,
                    ins[1],
                    ins[2] if len(ins) > 2 else None,
                    stride=tuple(a.get("strides", [1, 1])),
                    padding=tuple(pads[:2]),
                    dilation=tuple(a.get("dilations", [1, 1])),
                    groups=int(a.get("group", 1)),
                )
            elif op == "Gemm":
                xa = ins[0].t() if a.get("transA", 0) else ins[0]
                wb = ins[1].t() if a.get("transB", 0) else ins[1]
                y = a.get("alpha", 1.0) * xa @ wb
                if len(ins) > 2 and ins[2] is not None:
                    y = y + a.get("beta", 1.0) * ins[2]
            elif op == "Add":
                y = ins[0] + ins[1]
            elif op == "Relu":
                y = F.relu(ins[0])
            elif op == "Clip":
                lo = float(ins[1]) if len(ins) > 1 and ins[1] is not None else a.get("min", -np.inf)
                hi = float(ins[2]) if len(ins) > 2 and ins[2] is not None else a.get("max", np.inf)
                y = torch.clamp(ins[0], lo, hi)
            elif op == "GlobalAveragePool":
                y = ins[0].mean(dim=(2, 3), keepdim=True)
            else:  # Flatten
                y = torch.flatten(ins[0], int(a.get("axis", 1)))
            env[n.output[0]] = y
        return env[self.output_name]

    __call__ = forward

    def export(self) -> onnx.ModelProto:
        """A copy of the graph with the trained weights rounded into its int8 / int32 initializers (scales and
        zero points unchanged)."""
        out = onnx.ModelProto()
        out.CopyFrom(self.model)
        inits = {i.name: i for i in out.graph.initializer}
        for key, s in self.slots.items():
            v = self.params[key].detach().numpy()
            if s.qtype == onnx.TensorProto.INT32:
                v = v / s.scale
            lo, hi = self.qrange[key]
            q = np.clip(np.round(v) + s.zero_point, lo, hi)
            dtype = onnx.helper.tensor_dtype_to_np_dtype(s.qtype)
            inits[s.init_name].CopyFrom(numpy_helper.from_array(q.astype(dtype), s.init_name))
        return out


def augment_batch(x, rng: np.random.Generator, min_area: float = 0.35):
    """Random horizontal flip and random resized crop (area ``min_area``-1, aspect 3/4-4/3, bilinear back to the
    input size; Szegedy et al. 2015, "Going Deeper with Convolutions") of a float tensor batch [N, C, H, W].
    Works on normalized tensors: both operations are linear in the pixel values."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    out = []
    for i in range(n):
        area = rng.uniform(min_area, 1.0) * h * w
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch = int(min(h, round(np.sqrt(area / aspect))))
        cw = int(min(w, round(np.sqrt(area * aspect))))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = x[i : i + 1, :, top : top + ch, left : left + cw]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        out.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False))
    return torch.cat(out)


def distill_qdq(
    qdq: onnx.ModelProto,
    images: np.ndarray,
    teacher: Callable[[np.ndarray], np.ndarray],
    steps: int,
    batch_size: int = 16,
    lr: float = 0.005,
    bias_lr: float = 1e-5,
    temperature: float = 2.0,
    seed: int = 0,
    threads: int = 2,
    augment: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> onnx.ModelProto:
    """Fine-tune the weights of ``qdq`` so its logits match the ``teacher``'s (see the module docstring).

    Args:
        qdq: the calibrated QDQ graph (not modified).
        images: float32 [N, C, H, W], preprocessed as the model expects (unlabeled).
        teacher: float32 [B, C, H, W] -> float32 [B, classes] logits of the fp32 model (e.g. an ONNX Runtime
            session); called on every training batch, so augmented images get their own targets.
        steps: optimizer steps (Adam), ``batch_size`` images each.
        lr: Adam learning rate of the int8 weights, in units of each channel's quantization step.
        bias_lr: Adam learning rate of the int32 biases, in real units.
        temperature: softmax temperature of the KL.
        augment: draw each batch through :func:`augment_batch` (with ~100 images, without it the fine-tune
            over-fits them).
        on_step: called with (step, loss) after each step.

    Returns:
        A new ModelProto, same nodes and quantization parameters, new int8 weights and int32 biases.

    Raises:
        ValueError: ``images`` not [N, C, H, W], ``steps`` < 1, or an unsupported op.
    """
    import torch

    from tcsched.build_tools.finetune import distillation_loss

    if images.ndim != 4 or len(images) < 1:
        raise ValueError(f"need images [N, C, H, W], got {images.shape}")
    if steps < 1 or batch_size < 1 or not lr > 0 or not bias_lr >= 0:
        raise ValueError(
            f"need steps >= 1, batch_size >= 1, lr > 0 and bias_lr >= 0, got {steps}, {batch_size}, {lr}, {bias_lr}"
        )
    graph = QDQTorchGraph(qdq)
    torch.manual_seed(seed)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        opt = torch.optim.Adam(
            [
                {"params": graph.weight_parameters(), "lr": lr},
                {"params": graph.bias_parameters(), "lr": bias_lr},
            ]
        )
        rng = np.random.default_rng(seed)
        n = len(images)
        for step in range(steps):
            x = x_all[torch.from_numpy(rng.choice(n, size=min(batch_size, n), replace=False))]
            if augment:
                x = augment_batch(x, rng)
            t = torch.from_numpy(np.asarray(teacher(x.numpy()), dtype=np.float32))
            loss = distillation_loss(graph(x), t, temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if on_step is not None:
                on_step(step, float(loss.detach()))
    finally:
        torch.set_num_threads(prev_threads)
    return graph.export()
