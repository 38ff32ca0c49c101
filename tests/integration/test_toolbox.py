"""tcsched with the tools Triton users run against a repository, on the real server: labels on every
classifier model (class_count), a config with a smaller max_batch_size loaded through the repository API (what
Model Analyzer's sweep does), perf_analyzer with real JPEGs through the README's two commands, `tcsched serve`
passing tritonserver options through with its security defaults kept, and `classify --json`."""

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as http

from tcsched.data import default_photo
from tcsched.imaging import preprocess_bytes
from tcsched.manifest import Manifest
from tcsched.names import LABELS_FILE, LOGITS, PIXELS, SCHEDULER
from tcsched.server import ADMIN_HEADER, free_port

pytestmark = pytest.mark.integration
TCSCHED = Path(sys.executable).parent / "tcsched"


def cli(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(TCSCHED), *map(str, args)], capture_output=True, text=True, timeout=timeout)


def photos() -> list[Path]:
    return [default_photo(n) for n in ("chelsea", "coffee", "astronaut")]


def test_class_count_with_labels_on_every_classifier_model(server, built_repo):
    m = Manifest.read(built_repo / "manifest.json")
    labels = (built_repo / "classifier" / LABELS_FILE).read_text().splitlines()
    x = preprocess_bytes(default_photo("chelsea").read_bytes())[None]
    c = http.InferenceServerClient(server.http_url)
    models = [(v.name, m.input.name, m.output.name) for v in m.variants] + [(SCHEDULER, PIXELS, LOGITS)]
    for model, inp_name, out_name in models:
        inp = http.InferInput(inp_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        r = c.infer(model, [inp], outputs=[http.InferRequestedOutput(out_name, class_count=3)])
        entries = [e.decode() for e in r.as_numpy(out_name).reshape(-1)]
        assert len(entries) == 3, model
        for e in entries:
            score, index, label = e.split(":", 2)
            assert label == labels[int(index)], (model, e)
            float(score)
    c.close()


def _repository(server, model: str, action: str, body: dict) -> None:
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/repository/models/{model}/{action}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **server.admin_headers()},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=120):
        pass


def test_a_variant_loads_with_a_smaller_max_batch_size_and_more_instances(server, built_repo):
    m = Manifest.read(built_repo / "manifest.json")
    v = m.variant("int8").name
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{v}/config", timeout=10) as r:
        cfg = json.loads(r.read())
    assert cfg["max_batch_size"] == 8 and [w["batch_size"] for w in cfg["model_warmup"]] == [1]
    # as Model Analyzer derives one: max_batch_size and instances changed, dynamic batching reset (the served
    # config's preferred_batch_size, filled in by Triton, would exceed the new max_batch_size)
    derived = {
        **cfg,
        "max_batch_size": 1,
        "instance_group": [{"count": 2, "kind": "KIND_CPU"}],
        "dynamic_batching": {},
    }
    try:
        _repository(server, v, "load", {"parameters": {"config": json.dumps(derived)}})
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{v}/config", timeout=10) as r:
            now = json.loads(r.read())
        assert now["max_batch_size"] == 1 and now["instance_group"][0]["count"] == 2
        x = preprocess_bytes(default_photo("coffee").read_bytes())[None]
        c = http.InferenceServerClient(server.http_url)
        inp = http.InferInput(m.input.name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        assert np.isfinite(c.infer(v, [inp]).as_numpy(m.output.name)).all()
        c.close()
        # a reload that fails (e.g. in a warmup sample over the new max_batch_size) is not tried here: tritonserver
        # 2.51 segfaults in ~1 of 6 such reloads of a loaded model (measured; the reload crashes of
        # server#7723 and model_analyzer#1018), which is why every served config warms up at batch 1 only
    finally:  # back to the repository's own config: a plain load keeps an override, unload + load does not
        _repository(server, v, "unload", {})
        _repository(server, v, "load", {})
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{v}/config", timeout=10) as r:
        assert json.loads(r.read())["max_batch_size"] == 8


def test_perf_analyzer_with_real_jpegs_through_the_readme_commands(server, tmp_path):
    data = tmp_path / "data.json"
    out = cli("perf-data", *photos(), "-o", data)
    assert out.returncode == 0, out.stderr
    steps = json.loads(data.read_text())["data"]
    assert len(steps) == 3 and steps[0]["IMAGE"]["shape"] == [1]
    out = cli(
        "perf-analyzer",
        "-m",
        "classifier",
        "-u",
        server.grpc_url,
        "-i",
        "grpc",
        "--input-data",
        data,
        "--shape",
        "IMAGE:1",
        "--concurrency-range",
        "1",
        "--measurement-interval",
        "1000",
        "-s",
        "50",
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "Concurrency: 1, throughput:" in out.stdout


def test_classify_json_carries_the_table_and_top_k(server):
    out = cli("classify", *photos()[:2], "--url", f"http://{server.http_url}/", "--top-k", "3", "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    for r in rows:
        assert len(r["topk"]) == 3 and r["variant"] and r["reason"] == r["decision"]["reason"]
        assert "cascade" in r and "latency_ms" in r and "escalated" in r
    table = cli(
        "classify", photos()[0], "--url", f"grpc://{server.grpc_url}", "--protocol", "grpc", "--top-k", "2"
    )
    assert table.returncode == 0, table.stderr
    assert "top-2" in table.stdout and "top-5" not in table.stdout


def test_serve_passes_tritonserver_options_through_and_keeps_the_restriction(built_repo, tmp_path):
    ports = [free_port() for _ in range(3)]
    log = tmp_path / "serve.out"
    with open(log, "w") as f:
        p = subprocess.Popen(
            [
                str(TCSCHED),
                "serve",
                "--repo",
                built_repo,
                "--http-port",
                str(ports[0]),
                "--grpc-port",
                str(ports[1]),
                "--metrics-port",
                str(ports[2]),
                "--",
                "--log-info=false",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and "tritonserver ready" not in log.read_text():
            assert p.poll() is None, log.read_text()
            time.sleep(1)
        text = log.read_text()
        assert "tritonserver options passed through: --log-info=false" in text and "stub watchdog: on" in text
        server_log = Path(text.split("(log: ", 1)[1].split(")", 1)[0])
        assert "successfully loaded" not in server_log.read_text()  # an info line: info is off
        # the admin APIs stay restricted: the repository index needs the key
        req = urllib.request.Request(
            f"http://127.0.0.1:{ports[0]}/v2/repository/index", data=b"{}", method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 403 and ADMIN_HEADER in e.value.read().decode()
    finally:
        p.terminate()
        p.wait(60)
