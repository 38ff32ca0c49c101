"""``tcsched build --model``: every refusal before any work, with its reason (build_tools/model_source.py).

The ONNX classifiers are built here with ``onnx.helper``; the torch ones are small modules of this file, loaded
through the ``package.module:callable`` form like a user's.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from tcsched.build_tools import build as build_mod
from tcsched.build_tools.model_source import (
    ModelSourceError,
    load_onnx_classifier,
    parse_model_spec,
    resolve_model,
)

CLASSES = 10


def onnx_classifier(
    path,
    *,
    input_shape=("N", 3, 32, 32),
    input_type=TensorProto.FLOAT,
    output_shape=("N", CLASSES),
    fixed_reshape: list[int] | None = None,
):
    """Conv 3->4 (3x3) -> Relu -> GlobalAveragePool -> Flatten (or Reshape to ``fixed_reshape``) -> Gemm 4->10,
    input ``image``, output ``scores``; written to ``path``."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b"),
        numpy_helper.from_array(rng.normal(size=(CLASSES, 4)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(CLASSES, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
    ]
    if fixed_reshape is None:
        nodes.append(helper.make_node("Flatten", ["p"], ["f"], axis=1))
    else:
        inits.append(numpy_helper.from_array(np.array(fixed_reshape, np.int64), "shape"))
        nodes.append(helper.make_node("Reshape", ["p", "shape"], ["f"]))
    nodes.append(helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["scores"], transB=1))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", input_type, list(input_shape))],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, list(output_shape))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def tiny_net():
    """A torch classifier for the callable form: float32 [N, 3, H, W] -> [N, 10]."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, CLASSES)
    )


def not_a_module():
    return "a string"


def labels_file(tmp_path, n):
    p = tmp_path / f"labels{n}.txt"
    p.write_text("".join(f"class {i}\n" for i in range(n)))
    return p


# ------------------------------------------------------------------------------------------------------- ONNX


def test_onnx_input_that_is_not_4d_float_is_refused(tmp_path):
    flat = onnx_classifier(tmp_path / "flat.onnx", input_shape=("N", 3, 32, 32))
    m = onnx.load(str(flat))
    m.graph.input[0].type.tensor_type.shape.dim.pop()  # [N, 3, 32]
    onnx.save(m, str(tmp_path / "3d.onnx"))
    with pytest.raises(
        ModelSourceError,
        match=r"input 'image' is float32 \['N', 3, 32\] \(3-D\); expected float32 \[N, C, H, W\]",
    ):
        resolve_model(str(tmp_path / "3d.onnx"), labels_file=labels_file(tmp_path, CLASSES))
    onnx_classifier(tmp_path / "int.onnx", input_type=TensorProto.INT64)
    with pytest.raises(ModelSourceError, match=r"input 'image' is int64 .*expected float32 \[N, C, H, W\]"):
        resolve_model(str(tmp_path / "int.onnx"), labels_file=labels_file(tmp_path, CLASSES))


def test_onnx_output_that_is_not_2d_is_refused(tmp_path):
    onnx_classifier(tmp_path / "o.onnx", output_shape=("N", CLASSES, 1))
    with pytest.raises(
        ModelSourceError,
        match=r"output 'scores' is float32 \['N', 10, 1\] \(3-D\); expected float32 \[N, classes\]",
    ):
        resolve_model(str(tmp_path / "o.onnx"), labels_file=labels_file(tmp_path, CLASSES))


def test_a_fixed_batch_axis_is_made_dynamic_and_the_names_normalised(tmp_path):
    path = onnx_classifier(tmp_path / "b1.onnx", input_shape=(1, 3, 32, 32), output_shape=(1, CLASSES))
    model, chw, classes, notes = load_onnx_classifier(path)
    assert chw == [3, 32, 32] and classes == CLASSES
    assert [i.name for i in model.graph.input] == ["input"] and model.graph.output[0].name == "logits"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert any("made dynamic" in n for n in notes)
    r = resolve_model(str(path), labels_file=labels_file(tmp_path, CLASSES))
    # the crop comes from the model's input; the resize keeps torchvision's 256/224
    assert r.preprocessing.crop_size == (32, 32) and r.preprocessing.resize_size == round(32 * 256 / 224)
    assert r.input_chw == (3, 32, 32) and r.spec.name == "b1"


def test_a_batch_axis_that_cannot_be_made_dynamic_is_refused(tmp_path):
    path = onnx_classifier(
        tmp_path / "fixed.onnx", input_shape=(1, 3, 32, 32), output_shape=(1, CLASSES), fixed_reshape=[1, 4]
    )
    with pytest.raises(ModelSourceError, match="batch axis cannot be made dynamic"):
        resolve_model(str(path), labels_file=labels_file(tmp_path, CLASSES))


def test_labels_file_of_another_length_than_the_classes_is_refused(tmp_path):
    path = onnx_classifier(tmp_path / "m.onnx")
    with pytest.raises(ModelSourceError, match="has 9 names but the model's output has 10 classes"):
        resolve_model(str(path), labels_file=labels_file(tmp_path, 9))
    with pytest.raises(ModelSourceError, match="10 classes: give --labels FILE"):
        resolve_model(str(path))  # ImageNet's names only for 1000 classes


def test_mean_std_of_another_length_than_the_channels_is_refused(tmp_path):
    path = onnx_classifier(tmp_path / "m.onnx")
    four = (0.5, 0.5, 0.5, 0.5)
    with pytest.raises(ModelSourceError, match="mean/std have 4 values but the model's input has 3 channels"):
        resolve_model(
            str(path), labels_file=labels_file(tmp_path, CLASSES), overrides={"mean": four, "std": four}
        )
    with pytest.raises(ModelSourceError, match="mean has 4 values and std 3"):
        resolve_model(str(path), labels_file=labels_file(tmp_path, CLASSES), overrides={"mean": four})


def test_crop_larger_than_resize_and_crop_other_than_the_input_are_refused(tmp_path):
    path = onnx_classifier(tmp_path / "m.onnx")
    labels = labels_file(tmp_path, CLASSES)
    with pytest.raises(ModelSourceError, match=r"crop_size \[32, 32\] is larger than resize_size 30"):
        resolve_model(str(path), labels_file=labels, overrides={"resize_size": 30})
    with pytest.raises(
        ModelSourceError,
        match=r"crop_size \[40, 40\] differs from the model's input height and width \[32, 32\]",
    ):
        resolve_model(str(path), labels_file=labels, overrides={"crop_size": (40, 40)})
    spec_file = tmp_path / "pre.json"
    spec_file.write_text('{"resize_size": 64, "crop_size": 96}')
    with pytest.raises(ModelSourceError, match=r"crop_size \[96, 96\] is larger than resize_size 64"):
        resolve_model(
            "tests.unit.test_model_source:tiny_net", labels_file=labels, preprocessing_file=spec_file
        )


def test_weights_for_an_onnx_model_are_refused(tmp_path):
    with pytest.raises(ModelSourceError, match="an ONNX model carries its weights"):
        resolve_model(str(onnx_classifier(tmp_path / "m.onnx")), weights=tmp_path / "w.pth")


# ------------------------------------------------------------------------------------------------------ torch


def test_weights_that_do_not_match_the_architecture_list_the_keys(tmp_path):
    import torch

    state = tiny_net().state_dict()
    state["extra.weight"] = state.pop("4.weight")
    state["0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ModelSourceError) as e:
        resolve_model(
            "tests.unit.test_model_source:tiny_net",
            weights=tmp_path / "w.pth",
            labels_file=labels_file(tmp_path, CLASSES),
            overrides={"crop_size": (32, 32), "resize_size": 36},
        )
    msg = str(e.value)
    assert "missing keys (1): 4.weight" in msg and "unexpected keys (1): extra.weight" in msg
    assert "mis-shaped (1): 0.weight [8, 3, 3, 3] (expected [4, 3, 3, 3])" in msg


def test_torchvision_weights_of_another_architecture_are_refused(tmp_path):
    import torch

    torch.save(tiny_net().state_dict(), tmp_path / "w.pth")
    with pytest.raises(
        ModelSourceError, match=r"do not match torchvision mobilenet_v3_small: missing keys \(\d+\)"
    ):
        resolve_model("torchvision:mobilenet_v3_small", weights=tmp_path / "w.pth")
    with pytest.raises(ModelSourceError, match="needs --weights FILE"):
        resolve_model("torchvision:mobilenet_v3_small")


def test_a_pickled_object_is_not_loaded_as_weights(tmp_path):
    import torch

    torch.save({"net": tiny_net()}, tmp_path / "module.pth")  # a pickled module, not a state dict
    with pytest.raises(ModelSourceError, match="torch.load\\(weights_only=True\\)"):
        resolve_model(
            "tests.unit.test_model_source:tiny_net",
            weights=tmp_path / "module.pth",
            labels_file=labels_file(tmp_path, CLASSES),
        )


def test_model_specs_of_no_known_form_are_refused(tmp_path):
    with pytest.raises(
        ModelSourceError, match="expected a path to an .onnx file, torchvision:<architecture>"
    ):
        parse_model_spec("just words")
    with pytest.raises(ModelSourceError, match="no ONNX file there"):
        parse_model_spec(str(tmp_path / "missing.onnx"))
    with pytest.raises(ModelSourceError, match="closest: mobilenet_v2"):
        parse_model_spec("torchvision:mobilenet_v9")
    with pytest.raises(ModelSourceError, match="cannot import no_such_package"):
        resolve_model("no_such_package.mod:make")
    with pytest.raises(ModelSourceError, match=r"not_a_module\(\) returned str; expected a torch.nn.Module"):
        resolve_model("tests.unit.test_model_source:not_a_module")
    assert parse_model_spec("examples.efficientnet_lite0:efficientnet_lite0").name == "efficientnet_lite0"
    assert parse_model_spec("torchvision:resnet18", name="My-Net").name == "my_net"


def test_torchvision_preset_gives_the_preprocessing_defaults(tmp_path):
    import torchvision

    torch_model = torchvision.models.efficientnet_b0()
    import torch

    torch.save(torch_model.state_dict(), tmp_path / "w.pth")
    r = resolve_model(
        "torchvision:efficientnet_b0", weights=tmp_path / "w.pth", overrides={"mean": (0.5,) * 3}
    )
    # EfficientNet_B0_Weights.IMAGENET1K_V1: crop 224, resize 256, bicubic (torchvision's weight metadata)
    assert (r.preprocessing.crop_size, r.preprocessing.resize_size, r.preprocessing.interpolation) == (
        (224, 224),
        256,
        "bicubic",
    )
    assert r.preprocessing.mean == (0.5, 0.5, 0.5) and r.classes == 1000 and len(r.labels) == 1000


# ------------------------------------------------------------------------------------------------ the build


def test_the_build_refuses_before_any_work(tmp_path):
    path = onnx_classifier(tmp_path / "m.onnx")
    cfg = build_mod.BuildConfig(
        output=tmp_path / "repo",
        work_dir=tmp_path / "work",
        report_dir=tmp_path / "reports",
        model=str(path),
        labels_file=labels_file(tmp_path, 7),
    )
    with pytest.raises(ModelSourceError, match="has 7 names but the model's output has 10 classes"):
        build_mod.build(cfg, Console(quiet=True))
    assert not (tmp_path / "work").exists() and not (tmp_path / "repo").exists()


def test_the_command_line_names_the_refusal(tmp_path):
    import subprocess
    import sys

    path = onnx_classifier(tmp_path / "m.onnx")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tcsched.cli",
            "build",
            "--model",
            str(path),
            "--mean",
            "0.5,0.5",
            "--std",
            "1,1",
            "-o",
            str(tmp_path / "repo"),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "mean/std have 2 values but the model's input has 3 channels" in out.stderr.replace("\n", " ")
    assert not (tmp_path / "work").exists()
    out = subprocess.run(
        [sys.executable, "-m", "tcsched.cli", "build", "--crop-size", "2x3x4", "-o", str(tmp_path / "repo")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "expected S or H,W in px" in out.stderr.replace("\n", " ")


def test_a_manifest_before_1_3_reads_as_mobilenet_v2_with_imagenet_preprocessing(tmp_path):
    import json

    from tcsched.manifest import Manifest
    from tcsched.preprocessing import IMAGENET

    old = {
        "schema_version": "1.2",
        "source_model": "torchvision mobilenet_v2 IMAGENET1K_V1",
        "input": {"name": "input", "dtype": "float32", "shape": [3, 224, 224]},
        "output": {"name": "logits", "dtype": "float32", "shape": [1000]},
        "max_batch_size": 8,
        "reference_variant": "mobilenet_v2_fp32",
        "variants": [
            {
                "name": "mobilenet_v2_fp32",
                "precision": "fp32",
                "file": "mobilenet_v2_fp32/1/model.onnx",
                "size_bytes": 1,
            }
        ],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    m = Manifest.read(tmp_path / "manifest.json")
    assert (m.model, m.preprocessing, m.preprocess_spec, m.ensemble) == (None, None, IMAGENET, "classifier")
