"""Model analysis, layer by layer (import path ``tcsched.build_tools.analysis``): what each Conv/Gemm costs, how
it maps onto Tensor Cores, and what INT8 and 2:4 sparsity do to it (``tcsched analyze``; ``tcsched build`` uses
the report to pick per-layer precisions).

The analysis is a set of small rules in the style of NNCF/ModelOpt: each rule takes a :class:`LayerGeometry`
and returns a :class:`Verdict` (``ok`` and a ``reason`` that says why, with its source); :data:`RULES` lists them
and one loop applies them (:func:`run_rules`). The reasons reach the report (``analysis.json``), the terminal
table and the build notes.

Per layer (every ``Conv`` and ``Gemm`` whose weight is an initializer):

* geometry: kind (``pointwise`` / ``depthwise`` / ``grouped`` / ``full`` / ``linear``), in/out channels, kernel,
  stride, output shape (``onnx.shape_inference``; batch dimension kept symbolic), MACs and parameters per image;
* weights: per-output-channel max |w| (smallest and largest over channels), fraction of zeros, whether the weight
  already is 2:4 sparse;
* Tensor Core alignment: channels multiple of 8 (FP16) and 16 (INT8), see :func:`rule_fp16_alignment`;
* 2:4 sparsity: eligibility with its reason (:func:`rule_sparse24`), and ``prune24_sqnr_db``, the SQNR of this
  layer's output when only its weight is 2:4-pruned by magnitude (:func:`prune_2_4`);
* INT8 sensitivity: the error this layer adds when it alone is INT8 (uint8 asymmetric input activation,
  per-channel symmetric int8 weight, as ``build_tools/quantize.py`` quantizes the whole model): top-1
  agreement and mean KL of the final logits against fp32 on the calibration images, SQNR of its own output.

Cost: activation ranges come from one fp32 pass with every layer input exposed; then one graph per layer (QDQ
around that layer only, plus two parallel copies of the layer, one fp32 as reference and one with the pruned
weight) runs once over the calibration images. Measured on 2 CPU cores: MobileNetV2 (53 layers), 32 images of
224x224, 23-33 s (up to ~60 s with the cores shared), about 0.9 GB peak RSS.

Modules: :mod:`.geometry` (graph inspection), :mod:`.rules` (verdicts), :mod:`.weights` (2:4 pruning and INT8
math), :mod:`.probes` (ONNX Runtime sensitivity probes), :mod:`.schema` (``analysis.json``), :mod:`.analyzer`
(:func:`analyze`), :mod:`.presentation` (table, plot), :mod:`.cli` (``tcsched analyze``). The names below are
the public API; import them from this package.
"""

from tcsched.build_tools.analysis.analyzer import analyze, layer_report
from tcsched.build_tools.analysis.cli import analyze_command, load_calibration
from tcsched.build_tools.analysis.geometry import (
    LAYER_OPS,
    LayerGeometry,
    LayerKind,
    inferred_shapes,
    layer_geometries,
    layer_kind,
    layer_macs,
    node_names,
)
from tcsched.build_tools.analysis.presentation import plot, print_table, short_name
from tcsched.build_tools.analysis.probes import Calibration, build_probe_model, calibration_feeds
from tcsched.build_tools.analysis.rules import (
    FP16_CHANNEL_MULTIPLE,
    INT8_CHANNEL_MULTIPLE,
    RULES,
    SPARSE24_MIN_WIDTH,
    SRC_TENSOR_CORE_ALIGNMENT,
    SRC_TRT_SPARSITY,
    SRC_TRT_SPARSITY_WIDTH,
    Rule,
    Sparse24Outcome,
    Sparse24Verdict,
    Verdict,
    rule_fp16_alignment,
    rule_int8_alignment,
    rule_sparse24,
    run_rules,
)
from tcsched.build_tools.analysis.schema import (
    ANALYSIS_FILENAME,
    PLOT_FILENAME,
    SCHEMA_VERSION,
    AnalysisReport,
    AnalysisTotals,
    Int8Sensitivity,
    LayerReport,
    Sparse24Model,
    VerdictModel,
)
from tcsched.build_tools.analysis.weights import (
    activation_qparams,
    is_2to4,
    prune_2_4,
    quantize_weight_per_channel,
    weight_sparsity,
)

__all__ = [
    "ANALYSIS_FILENAME",
    "FP16_CHANNEL_MULTIPLE",
    "INT8_CHANNEL_MULTIPLE",
    "LAYER_OPS",
    "PLOT_FILENAME",
    "RULES",
    "SCHEMA_VERSION",
    "SPARSE24_MIN_WIDTH",
    "SRC_TENSOR_CORE_ALIGNMENT",
    "SRC_TRT_SPARSITY",
    "SRC_TRT_SPARSITY_WIDTH",
    "AnalysisReport",
    "AnalysisTotals",
    "Calibration",
    "Int8Sensitivity",
    "LayerGeometry",
    "LayerKind",
    "LayerReport",
    "Rule",
    "Sparse24Model",
    "Sparse24Outcome",
    "Sparse24Verdict",
    "Verdict",
    "VerdictModel",
    "activation_qparams",
    "analyze",
    "analyze_command",
    "build_probe_model",
    "calibration_feeds",
    "inferred_shapes",
    "is_2to4",
    "layer_geometries",
    "layer_kind",
    "layer_macs",
    "layer_report",
    "load_calibration",
    "node_names",
    "plot",
    "print_table",
    "prune_2_4",
    "quantize_weight_per_channel",
    "rule_fp16_alignment",
    "rule_int8_alignment",
    "rule_sparse24",
    "run_rules",
    "short_name",
    "weight_sparsity",
]
