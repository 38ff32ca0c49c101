"""ONNX Runtime sessions for the variant graphs: the ONNX Runtime engine of :mod:`tcsched.engines`.

Kept as the import path the build, the variant models and the tests use; the code lives in
:mod:`tcsched.engines.onnxruntime` (the engine) and :mod:`tcsched.engines.base` (input checks shared by every
runtime).
"""

from __future__ import annotations

from tcsched.engines.base import (
    InvalidInputError,
    batches,
    nonfinite_output_error,
    normalised_range,
)
from tcsched.engines.onnxruntime import OrtClassifier, make_session

__all__ = [
    "InvalidInputError",
    "OrtClassifier",
    "batches",
    "make_session",
    "nonfinite_output_error",
    "normalised_range",
]
