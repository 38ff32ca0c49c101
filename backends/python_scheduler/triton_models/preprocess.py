"""Triton Python-backend model ``preprocess``: encoded image bytes -> float32 [3, 224, 224].

Thin wrapper: the transform is ``tcsched.imaging`` (unit-tested against torchvision). A request whose bytes
do not decode gets its own error response; the other requests of the batch are served.
"""

import triton_python_backend_utils as pb_utils

from tcsched.imaging import preprocess_batch


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
                out = preprocess_batch(images)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("INPUT", out)]))
            except ValueError as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"IMAGE: {e}")))
        return responses
