"""fp32: the exported graph itself, the reference every other variant is measured against."""

from __future__ import annotations

import numpy as np

from tcsched.build_tools.recipes.base import BuildContext, BuiltVariant, Recipe

# images of the evaluation split run through torch eager and the exported graph, to check the export
EAGER_CHECK_IMAGES = 8


class Fp32(Recipe):
    name = "fp32"
    precision = "fp32"
    step = "fp32 reference vs torch eager"

    def build(self, ctx: BuildContext) -> BuiltVariant:
        import torch

        if ctx.torch_model is None:  # an ONNX source: the graph is the model
            note = f"ONNX source {ctx.fp32_path.name} (no torch model to compare the graph with)"
            return self.built(ctx.fp32_path, ctx.plan("fp32"), [note])
        x = ctx.eval_images[: min(EAGER_CHECK_IMAGES, len(ctx.eval_images))]
        with torch.no_grad():
            eager = ctx.torch_model(torch.from_numpy(x)).numpy()
        diff = float(np.abs(ctx.fp32_session.predict(x) - eager).max())
        note = f"ONNX export opset {ctx.cfg.opset}; max |ORT - torch eager| logit diff {diff:.2e}"
        return self.built(ctx.fp32_path, ctx.plan("fp32"), [note])
