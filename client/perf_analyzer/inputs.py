"""perf_analyzer ``--input-data`` files: JSON with base64 content, one step per request (round robin); written
atomically."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from pathlib import Path

from tcsched.jsonio import atomic_write_text


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write_tensor_input_data(path: str | os.PathLike, input_name: str, tensors: Sequence) -> Path:
    """perf_analyzer ``--input-data`` JSON for a float32 (or uint8 pixels) tensor input: one step per tensor
    (round robin); perf_analyzer sends the raw bytes as the input's config data type.

    Args:
        tensors: numpy float32 or uint8 arrays, each one request's data without the batch dimension (e.g.
            [3,224,224]), all of one dtype.

    Raises:
        ValueError: no tensors, or a tensor that is neither float32 nor uint8, or mixed dtypes.
    """

    if not tensors:
        raise ValueError("need at least one tensor for --input-data")
    steps = []
    for t in tensors:
        if str(t.dtype) not in ("float32", "uint8") or t.dtype != tensors[0].dtype:
            raise ValueError(f"tensor input data must be all float32 or all uint8, got {t.dtype}")
        steps.append({input_name: {"b64": _b64(t.tobytes(order="C")), "shape": list(t.shape)}})
    return atomic_write_text(path, json.dumps({"data": steps}))


def write_bytes_input_data(path: str | os.PathLike, input_name: str, blobs: Sequence[bytes]) -> Path:
    """perf_analyzer ``--input-data`` JSON for a BYTES input of shape [1]: one encoded file per step.

    perf_analyzer copies ``b64`` content verbatim into the request's raw tensor, and Triton's raw BYTES format
    is a 4-byte little-endian length then the bytes; so each element is ``len32 || bytes``, base64-encoded.

    Raises:
        ValueError: no blobs, or an empty one.
    """

    if not blobs:
        raise ValueError("need at least one element for --input-data")
    steps = []
    for b in blobs:
        if not b:
            raise ValueError("empty element in BYTES input data")
        steps.append({input_name: {"b64": _b64(len(b).to_bytes(4, "little") + bytes(b)), "shape": [1]}})
    return atomic_write_text(path, json.dumps({"data": steps}))
