"""Triton Python-backend model ``preprocess``: encoded image bytes -> float32 [3, crop_h, crop_w], or uint8 pixels.

Thin wrapper: the transform is ``tcsched.imaging`` (unit-tested against torchvision, bounded against hostile
images) of the :class:`tcsched.preprocessing.PreprocessSpec` in the config's ``preprocessing`` parameter (the
ImageNet defaults when absent), made by the method of its ``preprocess_method`` parameter (``exact``:
torchvision's transform bit for bit, the default when absent; ``fast``: JPEG DCT-domain downscaling), in the
dtype of its output (``TYPE_FP32``: normalised; ``TYPE_UINT8``: the crop's pixels, which the variant graphs of a
``--pixels uint8`` build normalise themselves, ``tcsched.pixels``). A spec, method or dtype that is not valid,
or a spec that does not match the config's output dims, fails the model's load with a message naming what is
wrong. Each request of a dynamic batch is decoded on its own: a request whose bytes are not an acceptable image
gets its own ``INVALID_ARG`` response (HTTP 400, gRPC INVALID_ARGUMENT) naming the batch element and the
reason; the other requests of the batch are served. An unexpected fault of this model is ``INTERNAL``
(HTTP 500) for that request alone, its text cleaned of addresses and paths.
"""

import json

import triton_python_backend_utils as pb_utils

from tcsched.imaging import (
    ImageDecodeError,
    client_safe_text,
    method_of_model_config,
    preprocess_batch,
    spec_of_model_config,
)
from tcsched.pixels import dtype_of_model_config

INPUT_NAME = "IMAGE"
OUTPUT_NAME = "INPUT"


def _error(message: str, code) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args):
        # a PreprocessError here fails the load; Triton logs and returns its message
        cfg = json.loads(args["model_config"])
        self.spec = spec_of_model_config(cfg)
        self.method = method_of_model_config(cfg)
        self.dtype = dtype_of_model_config(cfg)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, INPUT_NAME)
                if tensor is None:  # Triton checks the config's inputs; kept for BLS callers
                    responses.append(
                        _error(f"missing input {INPUT_NAME!r}", pb_utils.TritonError.INVALID_ARG)
                    )
                    continue
                out = preprocess_batch(
                    tensor.as_numpy(), spec=self.spec, method=self.method, dtype=self.dtype
                )
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(OUTPUT_NAME, out)]))
            except ImageDecodeError as e:
                responses.append(_error(f"{INPUT_NAME}: {e}", pb_utils.TritonError.INVALID_ARG))
            except Exception as e:  # noqa: BLE001 - a fault here fails this request only, never the batch
                text = client_safe_text(str(e))
                responses.append(
                    _error(f"preprocess failed: {type(e).__name__}: {text}", pb_utils.TritonError.INTERNAL)
                )
        return responses
