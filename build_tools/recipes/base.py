"""The recipe interface: what a variant recipe declares, what it is given, what it returns, where it is registered.

A recipe makes one precision variant from the fp32 graph: it declares its ``name`` (the variant, and the Triton
model ``mobilenet_v2_<name>``), its manifest ``precision``, the variants it ``needs`` built first, and whether
ONNX Runtime on a CPU only emulates it (``emulated_on_cpu``: measured, but never served for speed there). Its
``build(ctx)`` reads what it needs from the :class:`BuildContext` and returns a :class:`BuiltVariant` (an ONNX
graph, its per-layer plan and the notes of how and why) or :class:`Dropped` (the notes of why not).

Recipes are registered by name in a :class:`RecipeRegistry`, as ONNX Runtime registers its operator quantizers by
op type (``onnxruntime/quantization/registry.py``): ``build()`` looks each requested variant up and runs them in
dependency order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from tcsched.precision import LayerPrecision, Precision

if TYPE_CHECKING:
    import onnx
    from rich.console import Console
    from rich.progress import Progress

    from tcsched.build_tools.analysis import AnalysisReport
    from tcsched.build_tools.config import BuildConfig
    from tcsched.build_tools.scoring import Score
    from tcsched.ort_runtime import OrtClassifier


@dataclass(frozen=True)
class BuiltVariant:
    """A variant a recipe made: ``path`` (ONNX graph, fp32 inputs/outputs), ``layer_plan`` (Conv/Gemm (and
    float Add) node -> what it computes in), ``notes`` (how it was built and why it was kept, for the manifest)."""

    name: str
    precision: Precision
    path: Path
    layer_plan: dict[str, LayerPrecision]
    notes: list[str]
    served_on_cpu_for_speed: bool


@dataclass(frozen=True)
class Dropped:
    """A variant a recipe measured and did not keep; ``notes`` say why (they go into the reference's notes)."""

    name: str
    notes: list[str]


@dataclass
class BuildContext:
    """What recipes read: the configuration, the fp32 reference, the image splits, the analysis, the work folder.

    Arrays are float32 [N, 3, 224, 224] preprocessed images and float32 [N, classes] logits; labels int [N] or
    ``None`` (unlabeled images). ``select_views`` are :func:`tcsched.build_tools.augment.label_preserving_views`
    of ``select`` (every choice is made on them), ``select_labels`` their labels, ``select_ref_logits`` the fp32
    logits on them. ``built`` holds the variants built so far, by name (a recipe reads its ``needs`` there).
    """

    cfg: BuildConfig
    work: Path
    torch_model: Any  # the fp32 torch.nn.Module the graph was exported from (eval mode)
    fp32_path: Path
    fp32_model: onnx.ModelProto
    fp32_session: OrtClassifier
    labels: list[str]  # class names, in logit order
    layer_names: list[str]  # the Conv/Gemm nodes of the fp32 graph, in graph order
    calib: np.ndarray
    select: np.ndarray
    select_views: np.ndarray
    select_labels: np.ndarray | None
    select_ref_logits: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray | None
    report: AnalysisReport
    progress: Progress
    console: Console
    built: dict[str, BuiltVariant] = field(default_factory=dict)

    def evaluate(self, model: onnx.ModelProto | str | Path) -> Score:
        """Score of a candidate graph (in memory or a file) against fp32 on the selection views."""
        from tcsched.build_tools.scoring import run_model, score

        logits = run_model(model, self.select_views, self.cfg.threads)
        return score(self.select_ref_logits, logits, self.select_labels)

    def plan(self, precision: LayerPrecision) -> dict[str, LayerPrecision]:
        """Every Conv/Gemm layer in ``precision``."""
        return dict.fromkeys(self.layer_names, precision)


class Recipe(ABC):
    """One variant recipe (see the module docstring). Subclasses set the class attributes and ``build``."""

    name: ClassVar[str]
    precision: ClassVar[Precision]
    needs: ClassVar[tuple[str, ...]] = ()
    emulated_on_cpu: ClassVar[bool] = False
    step: ClassVar[str] = ""  # the progress line while it builds ("" : the name)

    @abstractmethod
    def build(self, ctx: BuildContext) -> BuiltVariant | Dropped:
        """Make the variant (files under ``ctx.work``)."""

    def built(self, path: Path, layer_plan: dict[str, LayerPrecision], notes: Iterable[str]) -> BuiltVariant:
        """The :class:`BuiltVariant` of this recipe."""
        return BuiltVariant(
            self.name, self.precision, Path(path), dict(layer_plan), list(notes), not self.emulated_on_cpu
        )

    def dropped(self, notes: Iterable[str]) -> Dropped:
        return Dropped(self.name, list(notes))


class RecipeRegistry:
    """Recipes by name, in registration order; a recipe's ``needs`` must be registered before it, so the
    registration order is a dependency order."""

    def __init__(self) -> None:
        self._recipes: dict[str, Recipe] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._recipes)

    def register(self, recipe: Recipe) -> Recipe:
        """Add ``recipe``; returns it.

        Raises:
            ValueError: the name is taken, the recipe lacks a name or precision, or it needs a recipe that is
                not registered (yet).
        """
        name = getattr(recipe, "name", None)
        if not name or not getattr(recipe, "precision", None):
            raise ValueError(f"{type(recipe).__name__} must set the class attributes name and precision")
        if name in self._recipes:
            raise ValueError(
                f"a recipe named {name!r} is already registered ({type(self._recipes[name]).__name__})"
            )
        missing = [n for n in recipe.needs if n not in self._recipes]
        if missing:
            raise ValueError(
                f"recipe {name!r} needs {missing}: register those first; known: {list(self.names)}"
            )
        self._recipes[name] = recipe
        return recipe

    def unregister(self, name: str) -> Recipe:
        """Remove and return the recipe called ``name``.

        Raises:
            KeyError: unknown name (the message lists the known ones).
            ValueError: another registered recipe needs it.
        """
        recipe = self.get(name)
        users = [r.name for r in self._recipes.values() if name in r.needs]
        if users:
            raise ValueError(f"cannot unregister {name!r}: {users} need it")
        return self._recipes.pop(recipe.name)

    def get(self, name: str) -> Recipe:
        """Raises: KeyError: unknown name; the message lists the known ones."""
        try:
            return self._recipes[name]
        except KeyError:
            raise KeyError(f"unknown variant recipe {name!r}; known: {', '.join(self.names)}") from None

    def check_known(self, names: Iterable[str]) -> None:
        """Raises: ValueError: some of ``names`` are not registered (the message lists the known ones)."""
        unknown = set(names) - set(self._recipes)
        if unknown:
            raise ValueError(f"unknown variant(s) {sorted(unknown)}; supported: {list(self.names)}")

    def resolve(self, names: Iterable[str]) -> list[Recipe]:
        """The recipes called ``names``, in dependency (registration) order, each once.

        Raises:
            ValueError: an unknown name, or a recipe whose ``needs`` are not among ``names``.
        """
        wanted = set(names)
        self.check_known(wanted)
        chosen = [r for name, r in self._recipes.items() if name in wanted]
        for r in chosen:
            for dep in r.needs:
                if dep not in wanted:
                    raise ValueError(f"{r.name} is derived from the {dep} variant: add {dep} to the variants")
        return chosen
