"""The ``preprocess`` model in the real tritonserver reads its spec and method from its config.pbtxt: a
rectangular bicubic spec served ``exact`` equals tcsched.imaging in-process bit for bit, the default config's
``fast`` too, and a bad spec fails the load with its reason."""

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tcsched.build_tools import repository as r
from tcsched.data import default_photo
from tcsched.imaging import preprocess_bytes
from tcsched.preprocessing import PARAMETER_KEY, PreprocessSpec
from tcsched.server import TritonServer
from tests.helpers import make_manifest

pytestmark = pytest.mark.integration

RECT = PreprocessSpec(
    resize_size=240, crop_size=(200, 232), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3
)


def _preprocess_model(repo, name, opts, chw=(3, 224, 224), spec=None, params=None):
    cfg = r.preprocess_config(opts, list(chw), *([spec] if spec is not None else []))
    cfg.name = name
    for k, v in (params or {}).items():
        cfg.parameters[k].string_value = v
    r.write_model(repo, cfg, r.thin_model_source("preprocess"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    repo = tmp_path_factory.mktemp("pre") / "model_repository"
    _preprocess_model(repo, "pre_default", r.ServingOptions(preprocess_instances=1))
    _preprocess_model(
        repo,
        "pre_rect_exact",
        r.ServingOptions(preprocess_instances=1, preprocess_method="exact"),
        (3, 200, 232),
        RECT,
    )
    _preprocess_model(
        repo,
        "pre_bad",
        r.ServingOptions(preprocess_instances=1),
        params={PARAMETER_KEY: '{"resize_size": 100}'},
    )
    # the server refuses a folder without a manifest; these models do not read it
    make_manifest({"mobilenet_v2_fp32": ("fp32", 0.0, {1: 5.0})}).write(repo / "manifest.json")
    extra = ["--model-control-mode=explicit", "--load-model=pre_default", "--load-model=pre_rect_exact"]
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, extra_args=extra) as s:
        yield s


def _infer(server, model, data: bytes) -> np.ndarray:
    c = httpclient.InferenceServerClient(server.http_url)
    inp = httpclient.InferInput("IMAGE", [1, 1], "BYTES")
    inp.set_data_from_numpy(np.array([[data]], dtype=object))
    return c.infer(model, [inp]).as_numpy("INPUT")[0]


def test_served_preprocess_follows_its_config(served):
    data = default_photo("chelsea").read_bytes()
    opts = r.ServingOptions()
    rect = _infer(served, "pre_rect_exact", data)
    assert rect.shape == (3, 200, 232) and rect.dtype == np.dtype(opts.pixels)
    np.testing.assert_array_equal(rect, preprocess_bytes(data, spec=RECT, method="exact", dtype=opts.pixels))
    default = _infer(served, "pre_default", data)
    assert default.dtype == np.dtype(opts.pixels)
    np.testing.assert_array_equal(
        default, preprocess_bytes(data, method=opts.preprocess_method, dtype=opts.pixels)
    )


def test_a_bad_spec_fails_the_load_naming_it(served):
    admin = httpclient.InferenceServerClient(served.http_url)
    with pytest.raises(InferenceServerException, match="crop_size .* is larger than resize_size 100"):
        admin.load_model("pre_bad", headers=served.admin_headers())
    assert served.alive() and not admin.is_model_ready("pre_bad")
