"""Knowledge-distillation fine-tune of a 2:4-pruned student from the fp32 teacher, on unlabeled images.

Used by the ``sparse24`` variant (``--finetune-steps``). The masks stay fixed (re-applied after every step), so
the result keeps exactly the 2:4 pattern; batch norm runs in eval mode (its statistics stay the teacher's) and
folds into the pruned convolutions at export without breaking the pattern (the fold scales whole output channels).
Loss: KL(softmax(teacher / T) || softmax(student / T)) * T^2 (Hinton et al. 2015, "Distilling the Knowledge in a
Neural Network", arXiv:1503.02531).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np


def weight_modules(model) -> list:
    """Conv2d and Linear modules of ``model`` in registration order (= the ONNX Conv/Gemm order for MobileNetV2)."""
    import torch.nn as nn

    return [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]


def map_onnx_layers(model, onnx_layer_shapes: Sequence[tuple[str, tuple[int, ...]]]) -> dict[str, object]:
    """Map ONNX Conv/Gemm node names to torch modules by order, checking every weight shape.

    Raises:
        ValueError: the counts or a shape differ (the export is not the torch model's forward order).
    """
    mods = weight_modules(model)
    if len(mods) != len(onnx_layer_shapes):
        raise ValueError(
            f"{len(mods)} torch Conv/Linear modules vs {len(onnx_layer_shapes)} ONNX Conv/Gemm nodes"
        )
    out = {}
    for m, (name, shape) in zip(mods, onnx_layer_shapes, strict=True):
        if tuple(m.weight.shape) != tuple(shape):
            raise ValueError(
                f"ONNX layer {name} has weight {tuple(shape)}, torch module {tuple(m.weight.shape)}"
            )
        out[name] = m
    return out


def distillation_loss(student_logits, teacher_logits, temperature: float):
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2, mean over the batch (Hinton et al. 2015): torch
    float [B, classes] logits -> a scalar tensor (differentiable in ``student_logits``)."""
    import torch.nn.functional as F

    return F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        log_target=True,
        reduction="batchmean",
    ) * (temperature**2)


def distill_pruned(
    teacher,
    layers: dict[str, object],
    prune: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    images: np.ndarray,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-4,
    temperature: float = 2.0,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
):
    """Prune ``layers`` (names -> modules of ``teacher``) of a copy of ``teacher`` with ``prune`` and fine-tune it.

    Args:
        teacher: the fp32 torch model (left unchanged).
        layers: ONNX layer name -> module of ``teacher`` to prune (from :func:`map_onnx_layers`).
        prune: 2:4 magnitude pruning of a weight array, returning (pruned, mask).
        images: float32 [N, 3, H, W] preprocessed, unlabeled; random flips as augmentation.
        steps: optimizer steps (0: prune only).
        on_step: called with (step, loss) after every step (progress display).

    Returns:
        The pruned (and fine-tuned) student in eval mode.

    Raises:
        ValueError: ``steps`` < 0, ``batch_size`` < 1 or no images.
    """
    import torch

    if steps < 0 or batch_size < 1 or len(images) == 0:
        raise ValueError(
            f"need steps >= 0, batch_size >= 1 and images; got {steps}, {batch_size}, {len(images)}"
        )
    torch.manual_seed(seed)
    student = copy.deepcopy(teacher).eval()
    index = {id(m): i for i, m in enumerate(weight_modules(teacher))}
    s_mods = weight_modules(student)
    masks = []
    with torch.no_grad():
        for m in layers.values():
            sm = s_mods[index[id(m)]]
            pruned, mask = prune(sm.weight.detach().numpy())
            sm.weight.copy_(torch.from_numpy(pruned))
            masks.append((sm, torch.from_numpy(mask.astype(np.float32))))
    if steps == 0:
        return student
    teacher = teacher.eval()
    params = [p for n, p in student.named_parameters() if "bn" not in n]
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    x_all = torch.from_numpy(images)
    for step in range(steps):
        idx = rng.choice(len(images), size=min(batch_size, len(images)), replace=False)
        x = x_all[idx]
        flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        with torch.no_grad():
            t_logits = teacher(x)
        loss = distillation_loss(student(x), t_logits, temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for sm, mask in masks:
                sm.weight.mul_(mask)
        if on_step is not None:
            on_step(step, loss.item())
    return student.eval()
