"""Precision names: one definition for the build (``build_tools/recipes``) and the manifest.

``Precision`` names what a whole variant is (``VariantEntry.precision``); ``LayerPrecision`` what one Conv/Gemm
layer of it computes in (the values of ``VariantEntry.layer_precision``). A new precision is one more name here
and one recipe module (``build_tools/recipes``), or a precision a runtime computes a graph in (``bf16``: the fp32
graph on OpenVINO; ``bf16_mixed``: the same with the stem in f32; ``build_tools/recipes/pairs.py``).
"""

from __future__ import annotations

from typing import Literal, get_args

Precision = Literal["fp32", "bf16", "bf16_mixed", "fp16", "int8", "int8_mixed", "sparse24"]
LayerPrecision = Literal["fp32", "bf16", "fp16", "int8", "sparse24"]

PRECISIONS: tuple[Precision, ...] = get_args(Precision)
LAYER_PRECISIONS: tuple[LayerPrecision, ...] = get_args(LayerPrecision)

# every other variant's accuracy is measured against this one (the exported graph, unchanged)
REFERENCE: Precision = "fp32"
