"""fp16: ONNX Runtime's float16 converter with fp32 inputs/outputs (Cast nodes at the boundary).

TensorRT compiles the casts into FP16 kernels (strongly typed network); ONNX Runtime's CPU provider only
emulates fp16 (slower than fp32), so on a CPU it is measured but never served for speed.
"""

from __future__ import annotations

from tcsched.build_tools.graph_surgery import convert_fp16
from tcsched.build_tools.recipes.base import BuildContext, BuiltVariant, Recipe


class Fp16(Recipe):
    name = "fp16"
    precision = "fp16"
    emulated_on_cpu = True
    step = "fp16 (casts in the graph)"

    def build(self, ctx: BuildContext) -> BuiltVariant:
        path = convert_fp16(ctx.fp32_path, ctx.work / "fp16.onnx")
        note = (
            "onnxruntime.transformers.float16 with fp32 inputs/outputs; ONNX Runtime's CPU provider emulates "
            "fp16 (slower than fp32): never chosen for speed on a CPU; TensorRT builds FP16 kernels from it"
        )
        return self.built(path, ctx.plan("fp16"), [note])
