"""A ``--pixels uint8`` repository: preprocess sends 8-bit pixels, every variant graph normalises them first;
served by the real tritonserver, its variants give the logits of the float-input graphs on the float tensors,
and float input is refused with a clear error."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.http as httpclient
from rich.console import Console
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import InferenceServerException

from tcsched.build_tools.build import BuildConfig, build
from tcsched.build_tools.graph_surgery import strip_pixel_input
from tcsched.build_tools.repository import ServingOptions, parse
from tcsched.client.classify import ClassifierClient
from tcsched.data import default_photo, list_images
from tcsched.engines import load_engine
from tcsched.imaging import preprocess_bytes
from tcsched.manifest import Manifest
from tcsched.server import TritonServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pixel_repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pixels")
    cfg = BuildConfig(
        output=root / "model_repository",
        work_dir=root / "work",
        variants=["fp32", "int8"],
        latency_repeats=2,
        serving=ServingOptions(pixels="uint8", preprocess_instances=1),
    )
    build(cfg, Console(quiet=True))
    return cfg.output


def _input_type(repo: Path, model: str, which: str = "input") -> str:
    """The model_config.proto data type name of the first input (or output) of ``model``'s config."""
    cfg = parse((repo / model / "config.pbtxt").read_text())
    tensors = cfg.input if which == "input" else cfg.output
    return mc.DataType.Name(tensors[0].data_type)


def test_uint8_pixels_from_preprocess_to_every_variant(pixel_repo):
    m = Manifest.read(pixel_repo / "manifest.json")
    assert m.input.dtype == "uint8"
    assert _input_type(pixel_repo, "preprocess", "output") == "TYPE_UINT8"
    assert _input_type(pixel_repo, "scheduler") == "TYPE_UINT8"
    for v in m.variants:
        assert _input_type(pixel_repo, v.name) == "TYPE_UINT8", v.name
        graph = onnx.load(pixel_repo / v.file)
        assert graph.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert [n.op_type for n in graph.graph.node[:4]] == ["Cast", "Div", "Sub", "Div"]
        # the build checked the served graph against the one it measured
        assert any("served with uint8 pixels in" in n and "top-1 equal on" in n for n in v.build_notes), (
            v.name
        )


def test_served_pixel_variants_equal_the_float_graphs(pixel_repo, imagenet_sample):
    m = Manifest.read(pixel_repo / "manifest.json")
    data = [it.read_bytes() for it in list_images(imagenet_sample)[:6]]
    pixels = np.stack([preprocess_bytes(d, method="fast", dtype="uint8") for d in data])
    floats = np.stack([preprocess_bytes(d, method="fast") for d in data])
    with TritonServer(pixel_repo, http_port=0, grpc_port=0, metrics_port=0) as server:
        c = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
        client = ClassifierClient(server.http_url, "http", model=m.ensemble)
        try:
            for v in m.variants:
                float_graph = pixel_repo.parent / f"{v.name}_float.onnx"
                onnx.save(strip_pixel_input(onnx.load(pixel_repo / v.file)), float_graph)
                want = load_engine(v.runtime, float_graph, threads=1, precision=v.precision)(floats)
                inp = httpclient.InferInput("input", list(pixels.shape), "UINT8")
                inp.set_data_from_numpy(pixels)
                got = c.infer(v.name, [inp]).as_numpy("logits")
                if v.runtime == "onnxruntime":  # the same float32 operations in the same order
                    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5, err_msg=v.name)
                elif v.precision == "bf16_mixed":
                    # the f32 stem's output differs in its last float bits (normalisation folded or not),
                    # which moves the bf16 body's rounding by a step (8-bit mantissa: 0.4%) here and there
                    atol = 0.005 * float(np.abs(want).max())
                    np.testing.assert_allclose(got, want, rtol=1e-2, atol=atol, err_msg=v.name)
                else:  # OpenVINO folds the normalisation into the first layer
                    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-2, err_msg=v.name)
                assert (got.argmax(1) == want.argmax(1)).all(), v.name
                # through the ensemble (JPEG in): the same top-1
                for i, d in enumerate(data):
                    r = client.classify(d, top_k=1, parameters={"variant": v.name})
                    assert r.variant == v.name and r.topk[0].index == int(want[i].argmax()), (v.name, i)
            # float input to a pixel variant: refused by Triton, naming the data type
            bad = httpclient.InferInput("input", list(floats.shape), "FP32")
            bad.set_data_from_numpy(floats)
            with pytest.raises(InferenceServerException, match="(?i)uint8|data ?type"):
                c.infer(m.reference_variant, [bad])
            # and the server still serves
            assert client.classify(default_photo("chelsea").read_bytes(), top_k=5).topk
        finally:
            c.close()
            client.close()


def test_todays_float_path_beside_a_pixel_repository(pixel_repo, imagenet_sample, tmp_path):
    """The bench's today's path beside a uint8 repository sends float32 tensors (preprocess_exact's output),
    through scheduler_exact to the float-input copy of ONNX Runtime int8: the same top-1 as the uint8 path."""
    from tcsched.client.pipelines import SCHEDULER_EXACT, exact_path_name, write_pipelines

    m = Manifest.read(pixel_repo / "manifest.json")
    ort = next(v.name for v in m.variants if (v.runtime, v.precision) == ("onnxruntime", "int8"))
    overlay = write_pipelines(tmp_path / "overlay", m, [ort], repo=pixel_repo, float_variants=[ort])
    assert _input_type(overlay, "preprocess_exact", "output") == "TYPE_FP32"
    assert _input_type(overlay, SCHEDULER_EXACT) == "TYPE_FP32"
    assert _input_type(overlay, f"{ort}_float") == "TYPE_FP32"
    data = [it.read_bytes() for it in list_images(imagenet_sample)[:4]]
    with TritonServer(
        pixel_repo, http_port=0, grpc_port=0, metrics_port=0, extra_args=[f"--model-repository={overlay}"]
    ) as server:
        today = ClassifierClient(server.http_url, "http", model=exact_path_name(m.ensemble))
        new = ClassifierClient(server.http_url, "http", model=m.ensemble)
        try:
            for d in data:
                a = today.classify(d, top_k=1, parameters={"variant": f"{ort}_float"})
                b = new.classify(d, top_k=1, parameters={"variant": ort})
                assert a.variant == f"{ort}_float" and b.variant == ort
                ref = load_engine("onnxruntime", overlay / f"{ort}_float" / "1" / "model.onnx", threads=1)
                want = int(ref(preprocess_bytes(d, method="exact")[None])[0].argmax())
                assert a.topk[0].index == want
        finally:
            today.close()
            new.close()
