"""Variant recipes: the registry's rules, and a recipe registered here that a real build on a tiny graph runs."""

from __future__ import annotations

import json
from typing import get_args

import numpy as np
import onnx
import pytest
from rich.console import Console

from tcsched.build_tools import build as build_mod
from tcsched.build_tools.quantize import quantize_int8
from tcsched.build_tools.recipes import REGISTRY, BuildContext, BuiltVariant, Dropped, Recipe, RecipeRegistry
from tcsched.build_tools.recipes.pairs import PAIR_ONLY_PRECISIONS
from tcsched.build_tools.splits import load_images
from tcsched.engines import load_engine
from tcsched.manifest import Manifest
from tcsched.precision import Precision

# ----------------------------------------------------------------------------------------------------- registry


def _recipe(name: str, needs: tuple[str, ...] = (), precision: str = "int8") -> Recipe:
    def build(self, ctx):
        return self.dropped(["never built here"])

    attrs = {"name": name, "precision": precision, "needs": needs, "build": build}
    return type(name.title(), (Recipe,), attrs)()


def test_unknown_names_are_refused_with_the_known_ones_listed():
    reg = RecipeRegistry()
    reg.register(_recipe("a"))
    reg.register(_recipe("b"))
    with pytest.raises(KeyError, match="unknown variant recipe 'c'; known: a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['c'\]; supported: \['a', 'b'\]"):
        reg.resolve(["a", "c"])


def test_duplicate_and_incomplete_registrations_are_refused():
    reg = RecipeRegistry()
    reg.register(_recipe("a"))
    with pytest.raises(ValueError, match="'a' is already registered"):
        reg.register(_recipe("a", precision="fp16"))
    nameless = type("Nameless", (Recipe,), {"build": lambda self, ctx: None})()
    with pytest.raises(ValueError, match="must set the class attributes name and precision"):
        reg.register(nameless)
    assert reg.names == ("a",)


def test_dependencies_come_first_and_must_be_requested():
    reg = RecipeRegistry()
    with pytest.raises(ValueError, match=r"needs \['base'\]: register those first"):
        reg.register(_recipe("derived", needs=("base",)))
    reg.register(_recipe("ref"))
    reg.register(_recipe("base"))
    reg.register(_recipe("derived", needs=("base",)))
    # registration order is a dependency order, whatever order the names come in
    assert [r.name for r in reg.resolve(["derived", "ref", "base", "derived"])] == ["ref", "base", "derived"]
    with pytest.raises(
        ValueError, match="derived is derived from the base variant: add base to the variants"
    ):
        reg.resolve(["ref", "derived"])
    with pytest.raises(ValueError, match=r"\['derived'\] need it"):
        reg.unregister("base")
    reg.unregister("derived")
    assert reg.names == ("ref", "base")


def test_the_builtin_recipes_are_the_manifest_precisions():
    # every precision is a recipe's, or the precision a runtime gives a graph in a (runtime, graph) pair
    assert set(REGISTRY.names) | set(PAIR_ONLY_PRECISIONS) == set(get_args(Precision))
    assert not set(REGISTRY.names) & set(PAIR_ONLY_PRECISIONS)
    recipes = {n: REGISTRY.get(n) for n in REGISTRY.names}
    assert all(r.precision == n for n, r in recipes.items())
    assert recipes["int8_mixed"].needs == ("int8",)
    # ONNX Runtime's CPU provider runs fp16 (and 2:4 sparse fp16) by emulation: never served for speed
    assert {n for n, r in recipes.items() if r.emulated_on_cpu} == {"fp16", "sparse24"}


def test_build_config_refuses_what_the_registry_refuses():
    with pytest.raises(ValueError, match="unknown variant"):
        build_mod.BuildConfig(variants=("fp32", "int3")).validate()
    with pytest.raises(ValueError, match="fp32 variant is required"):
        build_mod.BuildConfig(variants=("int8",)).validate()
    with pytest.raises(ValueError, match="int8_mixed is derived from the int8 variant"):
        build_mod.BuildConfig(variants=("fp32", "int8_mixed")).validate()


# ---------------------------------------------------------------------------------------- a toy recipe, built


class Int8Percentile(Recipe):
    """A recipe added by a test: int8 with one fixed calibration (percentile 99.99), no choice, no fine-tune."""

    name = "int8_percentile"
    precision = "int8"

    def build(self, ctx: BuildContext) -> BuiltVariant:
        path = ctx.work / "int8_percentile.onnx"
        quantize_int8(ctx.fp32_path, path, ctx.calib, method="percentile", percentile=99.99)
        s = ctx.evaluate(path)
        note = f"percentile 99.99 on {len(ctx.calib)} images; selection agreement {s.agreement:.3f}"
        return self.built(path, ctx.plan("int8"), [note])


@pytest.fixture
def toy_recipe():
    recipe = REGISTRY.register(Int8Percentile())
    yield recipe
    REGISTRY.unregister(recipe.name)


def _tiny_source(tmp_path) -> build_mod.Source:
    """A small torch CNN (3x224x224 -> 10 classes) exported like MobileNetV2 (the build's export)."""
    import torch
    from torch import nn

    from tcsched.build_tools import export as ex

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=4, padding=1),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        nn.ReLU6(),
        nn.Conv2d(8, 16, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()
    path = ex.export_onnx(model, tmp_path / "tiny_fp32.onnx")
    return build_mod.Source(model, path, [f"class {i}" for i in range(10)], "test: tiny CNN")


def _cfg(tmp_path, variants) -> build_mod.BuildConfig:
    return build_mod.BuildConfig(
        output=tmp_path / "repo",
        work_dir=tmp_path / "work",
        report_dir=tmp_path / "reports",
        variants=variants,
        qat_steps=0,
        latency_repeats=2,
    )


def test_a_registered_recipe_is_built_measured_and_written(tmp_path, toy_recipe):
    cfg = _cfg(tmp_path, ("fp32", "int8_percentile"))
    manifest = build_mod.build(cfg, Console(quiet=True), source=_tiny_source(tmp_path))
    ort = [v.name for v in manifest.variants if v.runtime == "onnxruntime"]
    assert ort == ["mobilenet_v2_fp32", "mobilenet_v2_int8_percentile"]
    # the fp32 graph is also measured on OpenVINO (a pair); a recipe OpenVINO does not pair stays ONNX Runtime's
    pairs = [(v.name, v.precision) for v in manifest.variants if v.runtime == "openvino"]
    bf16 = [("mobilenet_v2_bf16_openvino", "bf16"), ("mobilenet_v2_bf16_mixed_openvino", "bf16_mixed")]
    assert pairs in (bf16, [("mobilenet_v2_fp32_openvino", "fp32")])
    toy = manifest.variant("mobilenet_v2_int8_percentile")
    assert toy.precision == "int8" and toy.serve_on_cpu_for_speed
    assert set(toy.layer_precision.values()) == {"int8"} and len(toy.layer_precision) == 4
    note, pixel_note = toy.build_notes  # the recipe's, then the default uint8 pixel input's check
    assert note.startswith("percentile 99.99 on ") and "selection agreement" in note
    assert pixel_note.startswith("served with uint8 pixels in") and "top-1 equal on" in pixel_note
    graph = onnx.load(str(cfg.output / toy.file))
    assert any(n.op_type == "QuantizeLinear" for n in graph.graph.node)
    assert toy.latency is not None and set(toy.latency.p50_ms_by_batch) == {1, 8}
    # the written manifest is the returned one, and the fp32 reference is measured against itself
    assert Manifest.read(cfg.output / "manifest.json").variants[1].build_notes == [note, pixel_note]
    fp32 = manifest.variant("mobilenet_v2_fp32")
    assert fp32.accuracy.agreement_with_fp32 == 1.0 and fp32.build_notes[0].startswith("ONNX export opset")
    assert json.loads((cfg.output / "analysis.json").read_text())["layers"]


class _Refuses(Recipe):
    name = "refuses"
    precision = "sparse24"

    def build(self, ctx: BuildContext) -> Dropped:
        return self.dropped(["it misses the budget", "(measured)"])


class _NeedsRefused(Recipe):
    name = "needs_refused"
    precision = "int8_mixed"
    needs = ("refuses",)

    def build(self, ctx: BuildContext) -> BuiltVariant:
        raise AssertionError("a recipe whose dependency was dropped must not run")


@pytest.fixture
def stages(tmp_path, toy_recipe):
    """The build's stages on the tiny graph, up to the built variants (no repository written)."""
    from rich.progress import Progress

    cfg = _cfg(tmp_path, ("fp32", "int8_percentile"))
    cfg.work_dir.mkdir()
    with Progress(console=Console(quiet=True)) as progress:
        step = progress.add_task("build")
        ctx = build_mod.prepare(
            cfg,
            build_mod.make_splits(cfg),
            _tiny_source(tmp_path),
            cfg.work_dir,
            progress,
            progress.console,
            step,
        )
        yield ctx


def test_measurements_hold_every_variants_logits_and_latencies(stages):
    ctx = stages
    outcome = build_mod.run_recipes(ctx, REGISTRY.resolve(["int8_percentile", "fp32"]))
    assert list(outcome.built) == ["fp32", "int8_percentile"] and not outcome.dropped
    m = build_mod.measure(ctx, outcome.built, "tiny")
    assert m.reference == "mobilenet_v2_fp32" and list(m.variants)[0] == m.reference
    n_views, n_eval = len(ctx.select_views), len(ctx.eval_images)
    assert n_views == 4 * len(ctx.select)
    np.testing.assert_array_equal(m.variants[m.reference].selection_logits, ctx.select_ref_logits)
    toy = m.variants["mobilenet_v2_int8_percentile"]
    assert toy.selection_logits.shape == (n_views, 10) and toy.eval_logits.shape == (n_eval, 10)
    assert not np.array_equal(toy.selection_logits, ctx.select_ref_logits)  # int8 is not fp32
    np.testing.assert_array_equal(m.select_groups[: len(ctx.select)], np.arange(len(ctx.select)))
    assert len(m.select_groups) == n_views and set(np.bincount(m.select_groups)) == {4}
    assert all(len(v) == ctx.cfg.latency_repeats for v in toy.latency_ms.values())
    assert set(m.p50_ms_by_batch()[m.reference]) == set(ctx.cfg.latency_batch_sizes)
    assert m.served_on_cpu_for_speed() == {m.reference: True, "mobilenet_v2_int8_percentile": True}


def test_a_dropped_recipe_drops_what_needs_it(stages):
    reg = RecipeRegistry()
    for r in (REGISTRY.get("fp32"), _Refuses(), _NeedsRefused()):
        reg.register(r)
    outcome = build_mod.run_recipes(stages, reg.resolve(reg.names))
    assert list(outcome.built) == ["fp32"]
    assert [(d.name, d.notes) for d in outcome.dropped] == [
        ("refuses", ["it misses the budget", "(measured)"]),
        ("needs_refused", ["needs refuses, which was not kept"]),
    ]


def test_figures_on_all_images_cover_every_labeled_image(tmp_path, toy_recipe):
    """The manifest's figures on all images (accuracy_all_images): every labeled image of --data-dir once, the
    calibration images past --calib-limit included, so that `tcsched eval` on the whole folder sees the same."""
    from rich.progress import Progress

    from tcsched.data import default_photos
    from tcsched.metrics import topk_accuracy
    from tcsched.preprocessing import IMAGENET

    data = tmp_path / "data"
    data.mkdir()
    photos = default_photos()
    rows = ["file,class_index"]
    for i in range(36):
        name = f"img{i:02d}{photos[i % len(photos)].path.suffix}"
        (data / name).write_bytes(photos[i % len(photos)].read_bytes())
        rows.append(f"{name},{i % 10}")
    (data / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = _cfg(tmp_path, ("fp32", "int8_percentile"))
    cfg.data_dir, cfg.calib_limit = data, 3
    cfg.work_dir.mkdir()
    splits = build_mod.make_splits(cfg)
    assert len(splits.calib) == 3 and splits.unused  # the hash split gives calibration more than 3 of 36
    assert len(splits.others) + len(splits.eval) == 36
    assert {it.path.name for it in splits.others}.isdisjoint(it.path.name for it in splits.eval)
    with Progress(console=Console(quiet=True)) as progress:
        step = progress.add_task("build")
        ctx = build_mod.prepare(
            cfg, splits, _tiny_source(tmp_path), cfg.work_dir, progress, progress.console, step
        )
        outcome = build_mod.run_recipes(ctx, REGISTRY.resolve(["int8_percentile", "fp32"]))
        others = build_mod._other_images(cfg, splits, ctx, progress, IMAGENET)
        m = build_mod.measure(ctx, outcome.built, "tiny", others=others)
        apart = load_images(splits.others, progress, "apart", method=cfg.serving.preprocess_method)
    ref, toy = m.variants[m.reference], m.variants["mobilenet_v2_int8_percentile"]
    every = build_mod.all_accuracy(toy, ref, m)
    assert every.n_images == 36 and "all 36 labeled images" in every.dataset
    assert build_mod.all_accuracy(ref, ref, m).agreement_with_fp32 == 1.0
    # the same figure from the images loaded apart, in the split's own order
    images = np.concatenate([apart, ctx.eval_images])
    labels = np.array([it.label for it in [*splits.others, *splits.eval]])
    logits = load_engine("onnxruntime", toy.variant.path).predict(images)
    assert every.top1 == pytest.approx(topk_accuracy(logits, labels, 1))
    # without --data-dir there are no others: no figure on all images
    cfg2 = _cfg(tmp_path / "b", ("fp32",))
    assert build_mod.make_splits(cfg2).others == []
