"""The engine interface: load a graph, run a batch, describe itself.

An :class:`Engine` takes float32 [N, 3, H, W] ImageNet-normalised images and returns float32 [N, classes]
logits. One module per runtime implements it: :mod:`tcsched.engines.onnxruntime`,
:mod:`tcsched.engines.openvino` here, and the TensorRT adapter beside the GPU code it wraps
(:mod:`tcsched.build_tools.tensorrt_adapter`). The build measures through it and the Python-backend variant
model serves through it, so the latency the build measures is the latency of the code the server runs.

Runtime libraries are imported inside the engines' constructors: importing this package needs neither
ONNX Runtime nor OpenVINO nor TensorRT.
"""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


class InvalidInputError(ValueError):
    """The input tensor is not what the model takes (dtype, shape, NaN or infinite values): a client error.

    The variant models answer it with ``INVALID_ARG`` (HTTP 400, gRPC INVALID_ARGUMENT)."""


class MissingRuntimeError(ImportError):
    """A runtime that is not installed was asked for; the message says how to install it."""


@dataclass(frozen=True)
class EngineInfo:
    """What an engine is: ``runtime`` (onnxruntime | openvino | tensorrt), its library ``version``, the
    ``precision`` it computes in (fp32, bf16, fp16, int8, ...), its intra-op ``threads`` (None: the runtime's
    default) and the ``device`` it runs on."""

    runtime: str
    version: str
    precision: str
    threads: int | None
    device: str = "cpu"


@functools.cache
def normalised_range() -> tuple[float, float]:
    """(low, high) of an ImageNet-normalised image: x in [0, 1] per channel, (x - mean) / std with
    torchvision's statistics (:data:`tcsched.imaging.IMAGENET_MEAN` / ``IMAGENET_STD``): about -2.118 to 2.640.
    A finite input inside it that gives non-finite logits is a fault of the model, not of the client."""
    from tcsched.imaging import IMAGENET_MEAN, IMAGENET_STD  # imported here: it imports PIL

    pairs = list(zip(IMAGENET_MEAN, IMAGENET_STD, strict=True))
    return min((0.0 - m) / s for m, s in pairs), max((1.0 - m) / s for m, s in pairs)


def expected_values() -> str:
    lo, hi = normalised_range()
    return f"expected finite ImageNet-normalised values (about {lo:.2f} to {hi:.2f})"


class Engine(ABC):
    """One classifier graph loaded by one runtime: float32 [N, 3, H, W] in, float32 [N, classes] logits out.

    Subclasses set ``input_shape`` (the graph's input shape, batch first; symbolic dimensions as strings), and
    ``input_dtype`` when the graph takes other than float32 (``uint8``: the pixels of a ``--pixels uint8`` build,
    :func:`tcsched.build_tools.graph_surgery.add_pixel_input`), and implement :meth:`run` and :meth:`describe`."""

    input_shape: list
    input_dtype: np.dtype = np.dtype(np.float32)

    @abstractmethod
    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits float32 [N, classes] of an input already checked by :meth:`check_input`."""

    @abstractmethod
    def describe(self) -> EngineInfo:
        """Runtime, version, precision and threads of this engine."""

    def prepare(self, batch_sizes, dims: list[int] | None = None) -> None:
        """Get ready to run these batch sizes, so that no request pays a first-run cost: here one run of zeros
        at the largest; engines that compile per shape (OpenVINO) compile each. ``dims``: C, H, W (default:
        the graph's, which must then be fixed)."""
        sizes = [int(b) for b in batch_sizes if int(b) >= 1]
        if sizes:
            self.run(np.zeros([max(sizes), *self._dims(dims)], dtype=self.input_dtype))

    def _dims(self, dims: list[int] | None) -> list[int]:
        if dims is not None:
            return [int(d) for d in dims]
        if not all(isinstance(d, int) for d in self.input_shape[1:]):
            raise ValueError(f"the graph's input {self.input_shape} has symbolic dimensions: give dims")
        return list(self.input_shape[1:])

    def check_input(self, x: np.ndarray) -> None:
        """Refuse what the graph must not run on. A float input costs one ``np.isfinite`` pass: 0.18 ms for
        [8, 3, 224, 224] on the project's 2-core machine (fp32 b8 ``session.run``: ~42 ms).

        Raises:
            InvalidInputError: ``x`` is not an array of the graph's dtype (:attr:`input_dtype`) and rank 4 with
                the model's C, H, W, or (float) holds NaN or infinite values; the message says what was received
                (no values echoed beyond a count and an index) and what is expected.
        """
        if not isinstance(x, np.ndarray):
            raise InvalidInputError(f"input must be a numpy array, got {type(x).__name__}")
        if x.dtype != self.input_dtype:
            raise InvalidInputError(f"input must be {self.input_dtype}, got {x.dtype}")
        expected = self.input_shape[1:]
        if x.ndim != 4 or any(
            isinstance(e, int) and e != s for e, s in zip(expected, x.shape[1:], strict=False)
        ):
            shape = list(x.shape) if x.ndim <= 8 else f"rank {x.ndim}"
            raise InvalidInputError(
                f"input must have shape [N, {', '.join(map(str, expected))}], got {shape}"
            )
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            bad = ~np.isfinite(x)
            first = [int(i) for i in np.argwhere(bad)[0]]
            raise InvalidInputError(
                f"input has {int(np.isnan(x).sum())} NaN and {int(np.isinf(x).sum())} infinite values "
                f"(first at index {first}); {expected_values()}"
            )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch: :meth:`check_input`, then :meth:`run`.

        Raises:
            InvalidInputError: see :meth:`check_input`.
        """
        self.check_input(x)
        return self.run(x)

    def predict(self, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Logits for any number of images, run ``batch_size`` at a time."""
        return np.concatenate([self(b) for b in batches(x, batch_size)], axis=0)


def batches(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(x), batch_size):
        yield np.ascontiguousarray(x[i : i + batch_size])


def nonfinite_output_error(x: np.ndarray, logits: np.ndarray) -> tuple[str, bool] | None:
    """``None`` when ``logits`` are all finite; else (message, is_client_error).

    A client error when the (finite) input reaches outside :func:`normalised_range` (values that large can
    overflow the graph, in fp16 above 65504); a model fault when it stays inside.
    """
    if np.isfinite(logits).all():
        return None
    if x.dtype.kind != "f":  # pixels are always in range: the fault is the model's
        return "the model produced non-finite logits for uint8 pixels", False
    lo, hi = float(x.min()), float(x.max())
    low, high = normalised_range()
    inside = low - 1e-3 <= lo and hi <= high + 1e-3
    where = f"input values {lo:.3g} to {hi:.3g}"
    if inside:
        return f"the model produced non-finite logits for an input in the normal range ({where})", False
    return (
        f"the model's logits for this input are not finite ({where}); {expected_values()}",
        True,
    )


PathLike = str | os.PathLike
