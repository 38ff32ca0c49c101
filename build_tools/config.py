"""Options of ``tcsched build``: :class:`BuildConfig`, the one definition of every default (the CLI reads them).

Importing this module is light (no onnx, ONNX Runtime or torch): ``tcsched --help`` shows these defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tcsched.build_tools import repository as repo_mod
from tcsched.precision import REFERENCE


@dataclass
class BuildConfig:
    """Options of ``tcsched build`` (units in names).

    ``variants=None`` builds every registered recipe (:data:`tcsched.build_tools.recipes.REGISTRY`) and keeps
    ``sparse24`` only if it meets the accuracy budget; naming ``sparse24`` explicitly keeps it whatever it
    measures (the manifest says so).
    """

    output: Path = Path("model_repository")
    work_dir: Path = Path(".tcsched/build")
    report_dir: Path = Path("reports/build")
    variants: Sequence[str] | None = None
    data_dir: Path | None = None
    calib_dir: Path | None = None
    calib_limit: int = 128
    calib_methods: Sequence[str] = ("minmax", "percentile:99.999", "percentile:99.99")
    eval_dir: Path | None = None
    eval_limit: int | None = None
    analysis_limit: int = 32
    max_top1_drop_points: float = 0.5
    min_agreement: float = 0.97
    max_float_layers: int = 24  # int8_mixed: beyond this many float nodes it is no longer an int8 variant
    # int8_mixed: latency / fp32's at the largest latency batch size, measured for every candidate in the search
    max_latency_ratio: float = 0.6
    finetune_steps: int = 0
    qat_steps: int = 200  # int8: quantization-aware fine-tune of the weights by distillation (0: off)
    # fewer calibration images than this: no fine-tune (it would learn them by heart)
    qat_min_images: int = 64
    weights: Path | None = None
    # the model (tcsched.build_tools.model_source): None is MobileNetV2; an .onnx path, torchvision:<arch> or
    # package.module:callable. model_name: prefix of the variants' Triton names (default: from the model)
    model: str | None = None
    model_name: str | None = None
    labels_file: Path | None = None
    preprocessing_file: Path | None = None
    # PreprocessSpec fields given one by one (resize_size, crop_size, interpolation, mean, std); None: not given
    preprocess_overrides: dict = field(default_factory=dict)
    ensemble_name: str = repo_mod.ENSEMBLE
    opset: int = 17
    latency_batch_sizes: Sequence[int] = (1, 8)
    # interleaved rounds per (variant, batch): the b8 ratio of one graph spread 0.54-0.62x over repeated runs
    # with 15 rounds and 0.57-0.59x with 50 on the 2-core build machine (README, "Measured here")
    latency_repeats: int = 50
    threads: int = 2
    serving: repo_mod.ServingOptions = field(default_factory=repo_mod.ServingOptions)

    @property
    def selected_variants(self) -> tuple[str, ...]:
        """The variants named, else every registered recipe, in the order given."""
        if self.variants:
            return tuple(self.variants)
        from tcsched.build_tools.recipes import REGISTRY

        return REGISTRY.names

    @property
    def explicit_variants(self) -> bool:
        """Whether the variants were named (a named ``sparse24`` is kept even when it misses the budget)."""
        return self.variants is not None

    def validate(self) -> None:
        """Fail fast, before any work.

        Raises:
            ValueError: unknown variant, no fp32, a variant without the one it derives from, bad batch sizes,
                limits or budgets, missing folders.
        """
        from tcsched.build_tools.quantize import parse_calib_method
        from tcsched.build_tools.recipes import REGISTRY

        REGISTRY.check_known(self.selected_variants)
        if REFERENCE not in self.selected_variants:
            raise ValueError(
                f"the {REFERENCE} variant is required: every other variant is measured against it"
            )
        REGISTRY.resolve(self.selected_variants)  # dependencies present
        self._validate_numbers()
        for spec in self.calib_methods:
            parse_calib_method(spec)
        for name, d in (
            ("data", self.data_dir),
            ("calibration", self.calib_dir),
            ("evaluation", self.eval_dir),
        ):
            if d is not None and not Path(d).is_dir():
                raise ValueError(f"{name} folder {d} does not exist")
        if self.data_dir is not None and (self.calib_dir is not None or self.eval_dir is not None):
            raise ValueError("give either data_dir (split three ways) or calib_dir/eval_dir, not both")
        self._validate_model_options()

    def _validate_model_options(self) -> None:
        import re

        for name, f in (("labels", self.labels_file), ("preprocessing", self.preprocessing_file)):
            if f is not None and not Path(f).is_file():
                raise ValueError(f"{name} file {f} does not exist")
        # Triton model names: a folder name in the repository; these characters are safe everywhere
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.ensemble_name):
            raise ValueError(
                f"ensemble name {self.ensemble_name!r}: expected letters, digits, '_', '.', '-' (a folder name)"
            )
        if self.ensemble_name in (repo_mod.PREPROCESS, repo_mod.SCHEDULER):
            raise ValueError(
                f"ensemble name {self.ensemble_name!r} is taken by the {self.ensemble_name} model"
            )
        is_onnx = bool(self.model) and str(self.model).endswith(".onnx")
        if is_onnx and self.finetune_steps:
            raise ValueError(
                "--finetune-steps fine-tunes the torch model; an ONNX source has none (use torchvision:<arch> or "
                "package.module:callable, or --finetune-steps 0)"
            )

    def _validate_numbers(self) -> None:
        if any(b < 1 for b in self.latency_batch_sizes):
            raise ValueError(f"latency batch sizes must be >= 1, got {list(self.latency_batch_sizes)}")
        mbs = self.serving.max_batch_size
        if mbs < 1:
            raise ValueError(f"max batch size must be >= 1, got {mbs}")
        if max(self.latency_batch_sizes) > mbs:
            raise ValueError(
                f"latency batch sizes {list(self.latency_batch_sizes)} exceed max batch size {mbs}"
            )
        if self.calib_limit < 1 or self.analysis_limit < 1:
            raise ValueError(
                f"calib_limit and analysis_limit must be >= 1, got {self.calib_limit}, {self.analysis_limit}"
            )
        if self.max_top1_drop_points < 0 or not 0 <= self.min_agreement <= 1:
            raise ValueError(
                f"budget: max top-1 drop must be >= 0 points and agreement in [0, 1], "
                f"got {self.max_top1_drop_points}, {self.min_agreement}"
            )
        if not self.max_latency_ratio > 0:
            raise ValueError(f"max_latency_ratio must be > 0, got {self.max_latency_ratio}")
        if self.finetune_steps < 0 or self.qat_steps < 0:
            raise ValueError(
                f"finetune_steps and qat_steps must be >= 0, got {self.finetune_steps}, {self.qat_steps}"
            )
        if not self.calib_methods:
            raise ValueError("at least one calibration method is needed")
