"""The torch sources of ``--model`` (the default MobileNetV2, ``torchvision:<architecture>``,
``package.module:callable``): their weights files loaded and checked key by key, the model built or imported,
the torchvision weights' eval preset, and the check that the model is a classifier of NCHW images.

Every refusal is a :class:`~tcsched.build_tools.model_spec.ModelSourceError` naming what was wrong.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Mapping
from pathlib import Path

from tcsched.build_tools.model_spec import ModelSourceError

#: keys listed per kind in a weights mismatch message (the count says how many more)
_LISTED_KEYS = 12


def load_state_dict(path: str | Path) -> dict:
    """A state dict from ``path``, with ``torch.load(map_location="cpu", weights_only=True)``; a checkpoint
    that wraps it under ``"state_dict"`` or ``"model"`` is unwrapped.

    Raises:
        ModelSourceError: no file, not loadable with ``weights_only`` (pickled code), or not a mapping of
            names to tensors.
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise ModelSourceError(f"--weights {p}: no such file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise ModelSourceError(
            f"--weights {p}: not a state dict that torch.load(weights_only=True) can read ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]})"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelSourceError(
            f"--weights {p}: expected a state dict (names -> tensors), got {type(state).__name__}"
        )
    return dict(state)


def _listed(keys) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - _LISTED_KEYS} more)" if len(keys) > _LISTED_KEYS else ""
    return ", ".join(keys[:_LISTED_KEYS]) + more


def check_state_dict(model, state: Mapping, what: str) -> None:
    """Refuse ``state`` unless its keys and shapes are exactly those of ``model.state_dict()``.

    Raises:
        ModelSourceError: the missing keys, the unexpected keys and the mis-shaped ones, listed.
    """
    own = model.state_dict()
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    shapes = [
        f"{k} {list(state[k].shape)} (expected {list(own[k].shape)})"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
        if shapes:
            parts.append(f"mis-shaped ({len(shapes)}): {', '.join(shapes[:_LISTED_KEYS])}")
        raise ModelSourceError(f"--weights do not match {what}: " + "; ".join(parts))


def _final_linear(model):
    """(name, module) of the last ``nn.Linear`` of ``model``, or None."""
    from torch import nn

    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = (name, mod)
    return last


def torchvision_model(arch: str, state: Mapping | None):
    """torchvision ``arch`` with ``state`` loaded. A state dict whose only difference is the final Linear's
    number of outputs (a fine-tuned classifier) builds the architecture with that ``num_classes``."""
    import torchvision

    model = torchvision.models.get_model(arch, weights=None)
    if state is None:
        return model
    last = _final_linear(model)
    if last is not None:
        key = f"{last[0]}.weight"
        if key in state and state[key].ndim == 2 and state[key].shape[0] != last[1].out_features:
            own = model.state_dict()
            others_match = set(own) == set(state) and all(
                tuple(own[k].shape) == tuple(state[k].shape) for k in own if k not in (key, f"{last[0]}.bias")
            )
            if others_match:
                model = torchvision.models.get_model(arch, weights=None, num_classes=int(state[key].shape[0]))
    check_state_dict(model, state, f"torchvision {arch}")
    model.load_state_dict(state)
    return model


@contextlib.contextmanager
def _cwd_importable():
    """The current folder on ``sys.path`` for the duration (``python -m``'s rule), as it was afterwards."""
    cwd = str(Path.cwd())
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


def callable_model(target: str):
    """Import ``package.module``, follow the attribute path, call it with no arguments.

    Raises:
        ModelSourceError: the module does not import, the attribute is missing or not callable, or the result
            is not a ``torch.nn.Module``.
    """
    from torch import nn

    module_name, attr_path = target.split(":", 1)
    with _cwd_importable():
        try:
            obj = importlib.import_module(module_name)
        except ImportError as e:
            raise ModelSourceError(f"--model {target}: cannot import {module_name} ({e})") from None
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ModelSourceError(f"--model {target}: {module_name} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ModelSourceError(f"--model {target}: {attr_path} is not callable")
    model = obj()
    if not isinstance(model, nn.Module):
        raise ModelSourceError(
            f"--model {target}: {attr_path}() returned {type(model).__name__}; expected a torch.nn.Module"
        )
    return model


def torchvision_preset(arch: str, weights: Path | None) -> tuple[dict, str]:
    """The eval-transform fields of ``arch``'s torchvision weights (``weights.transforms`` is a
    ``functools.partial`` of ``ImageClassification``; its keywords override the class's defaults), and which
    member they came from: the one whose download file name is ``weights``'s, else ``DEFAULT``. ``({}, "")``
    for an architecture without weights."""
    import inspect

    import torchvision

    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        return {}, ""
    members = list(enum)
    chosen = next(
        (w for w in members if weights is not None and w.url.rsplit("/", 1)[-1] == weights.name), None
    )
    chosen = chosen or enum.DEFAULT
    tf = chosen.transforms
    func = getattr(tf, "func", None)
    if func is None or func.__name__ != "ImageClassification":
        return {}, ""
    params = inspect.signature(func).parameters
    fields = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    fields.update(tf.keywords)
    out = {k: fields[k] for k in ("resize_size", "crop_size", "mean", "std") if k in fields}
    if "interpolation" in fields:
        out["interpolation"] = getattr(fields["interpolation"], "value", fields["interpolation"])
    return out, f"{type(chosen).__name__}.{chosen.name}"


def torch_output(model, chw: tuple[int, int, int], what: str) -> int:
    """Run ``model`` on zeros [1, C, H, W]; its number of classes.

    Raises:
        ModelSourceError: the forward pass fails or its output is not one 2-D tensor [1, classes].
    """
    import torch

    try:
        with torch.no_grad():
            y = model(torch.zeros(1, *chw))
    except Exception as e:  # noqa: BLE001 - any failure of a user's forward pass is reported as such
        raise ModelSourceError(
            f"{what} fails on a float32 [1, {', '.join(map(str, chw))}] input ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else ''}); expected an image classifier taking NCHW images"
        ) from None
    if not isinstance(y, torch.Tensor) or y.ndim != 2 or y.shape[0] != 1:
        got = f"shape {list(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ModelSourceError(f"{what}'s output is {got}; expected one 2-D tensor of logits [N, classes]")
    return int(y.shape[1])
