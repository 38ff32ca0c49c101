"""Parsers of perf_analyzer's outputs and the bench's validation, on excerpts captured from real 2.51 runs."""

import base64
import io
import json

import numpy as np
import pytest

import tcsched.client.perf_analyzer.parsers as pa
from tcsched.client.bench import BenchConfig, bench_targets, ramp_targets, serving_threads
from tcsched.client.perf_analyzer import (
    ModelStats,
    ProfileExperiment,
    RequestRecord,
    composing_csvs,
    parse_perf_csv,
    parse_profile_export,
    perf_analyzer_command,
    statistics_delta,
    variant_usage_delta,
    within_budget_share,
    write_bytes_input_data,
    write_tensor_input_data,
)

# `perf_analyzer -m classifier -i grpc -f classifier_c2.csv --verbose-csv --concurrency-range 2` (ensemble)
ENSEMBLE_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,Avg latency,request/response,response wait
2,74.79,22,7506,1,156,18306,544,4,24561,34287,37883,49180,26543,26,26481
"""
# the composing models' files beside it: preprocess_v1.classifier_c2.csv, scheduler_v1.classifier_c2.csv
PREPROCESS_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv
2,75.067,0,2,2398,58,6335,250,0
"""
SCHEDULER_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv
2,74.79,0,2,4347,98,11960,293,0
"""
# `--request-rate-range 31.8` on a variant
RATE_CSV = """\
Request Rate,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,Avg latency,request/response,response wait
31.8,31.8964,55,2843,2176,90,7805,212,3,12207,17025,21876,29364,13188,58,13094
"""
# without --verbose-csv (the warm-up run)
PLAIN_CSV = """\
Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency
8,23.8978,33,27609,1,543,90460,2233,1,123729,175308,175790,176370
"""

# `--profile-export-file` of a 3-request run of the ensemble forced to int8, JPEG bytes and logits shortened;
# perf_analyzer writes BYTES inputs raw (not valid UTF-8) with JSON escapes
PROFILE = (
    b'{"experiments":[{"experiment":{"mode":"concurrency","value":1},"requests":[{"timestamp":1795250729958812237,'
    b'"request_inputs":{"IMAGE":"\xff\xd8\xff\xe0\\u0000\\u0010JFIF\\u0000\\u0001\\u0001\\u"},'
    b'"response_timestamps":[1795250730031997409],"response_outputs":[{"VARIANT":"mobilenet_v2_int8",'
    b'"LOGITS":[15.372232437133789,13.016809463500977,6.198480606079102]}]},{"timestamp":1795250730032014304,'
    b'"request_inputs":{"IMAGE":"\xff\xd8\xff\xe0\\u0000\\u0010JFIF\\u0000\\u0001\\u0001\\u"},'
    b'"response_timestamps":[1795250730054399477],"response_outputs":[{"VARIANT":"mobilenet_v2_int8",'
    b'"LOGITS":[21.0748348236084,21.0748348236084,9.917569160461426]}]},{"timestamp":1795250730054495510,'
    b'"request_inputs":{"IMAGE":"\xff\xd8\xff\xe0\\u0000\\u0010JFIF\\u0000\\u0001\\u0001\\u"},'
    b'"response_timestamps":[1795250730073938168],"response_outputs":[{"VARIANT":"mobilenet_v2_int8",'
    b'"LOGITS":[7.810085773468018,3.595118761062622,21.0748348236084]}]}],'
    b'"window_boundaries":[1795250729956674192,1795250730958638942]}],"version":"2.51.0","service_kind":"triton",'
    b'"endpoint":""}'
)


def test_parse_ensemble_csv_and_composing():
    (row,) = parse_perf_csv(ENSEMBLE_CSV)
    assert row.mode == "concurrency" and row.load == 2
    assert row.throughput_infer_per_s == pytest.approx(74.79)
    assert (row.p50_ms, row.p90_ms, row.p95_ms, row.p99_ms) == pytest.approx((24.561, 34.287, 37.883, 49.18))
    assert row.avg_latency_ms == pytest.approx(26.543)
    assert row.server.compute_infer_ms == pytest.approx(18.306)
    (pre,) = parse_perf_csv(PREPROCESS_CSV)
    (sch,) = parse_perf_csv(SCHEDULER_CSV)
    assert pre.p99_ms is None and pre.server.queue_ms == pytest.approx(2.398)
    # the ensemble row sums compute over the composing models (their own windows: within 0.1%), not the queues
    total = pre.server.compute_infer_ms + sch.server.compute_infer_ms
    assert row.server.compute_infer_ms == pytest.approx(total, rel=1e-3)
    assert row.server.queue_ms == pytest.approx(0.001)


def test_parse_rate_and_plain_csv():
    (r,) = parse_perf_csv(RATE_CSV)
    assert r.mode == "request_rate" and r.load == pytest.approx(31.8)
    assert r.p99_ms == pytest.approx(29.364) and r.server.queue_ms == pytest.approx(2.176)
    (p,) = parse_perf_csv(PLAIN_CSV)
    assert p.load == 8 and p.avg_latency_ms is None and p.p99_ms == pytest.approx(176.37)
    # --collect-metrics appends a metrics block after a blank line
    (m,) = parse_perf_csv(PLAIN_CSV + "\nConcurrency,Avg GPU Utilization\n8,0\n")
    assert m.load == 8


def test_parse_csv_rejects_other_files():
    with pytest.raises(ValueError, match="not a perf_analyzer CSV"):
        parse_perf_csv("a,b\n1,2\n")


def test_composing_csv_names(tmp_path):
    report = tmp_path / "classifier_c2.csv"
    for name, text in [
        ("classifier_c2.csv", ENSEMBLE_CSV),
        ("preprocess_v1.classifier_c2.csv", PREPROCESS_CSV),
        ("scheduler_v1.classifier_c2.csv", SCHEDULER_CSV),
        ("scheduler_v1.other.csv", SCHEDULER_CSV),
    ]:
        (tmp_path / name).write_text(text)
    assert set(composing_csvs(report)) == {"preprocess", "scheduler"}


@pytest.mark.parametrize("chunk", [7, 64, 1 << 22])
def test_parse_profile_export_streaming(monkeypatch, chunk):
    monkeypatch.setattr(pa, "_TOKEN_MAX", 256)  # small buffers: tokens straddle chunk boundaries
    (e,) = parse_profile_export(io.BytesIO(PROFILE), chunk_size=chunk)
    assert (e.mode, e.value) == ("concurrency", 1.0)
    assert [r.start_ns for r in e.requests] == [1795250729958812237, 1795250730032014304, 1795250730054495510]
    assert e.requests[0].latency_ms == pytest.approx((1795250730031997409 - 1795250729958812237) / 1e6)
    assert e.output_counts("VARIANT") == {"mobilenet_v2_int8": 3}
    assert len(e.measured()) == 3


def test_profile_export_path_and_escaped_tokens(tmp_path):
    # an input string holding the text of a token (escaped quotes) must not be taken for one
    tricky = PROFILE.replace(b"JFIF", b'\\"timestamp\\":1,\\"VARIANT\\":\\"x\\"', 1)
    path = tmp_path / "p.json"
    path.write_bytes(tricky)
    (e,) = parse_profile_export(path)
    assert len(e.requests) == 3 and e.output_counts("VARIANT") == {"mobilenet_v2_int8": 3}
    assert within_budget_share(path, 50.0) == pytest.approx(2 / 3)  # latencies 73.2, 22.4, 19.4 ms
    with pytest.raises(ValueError, match="not a perf_analyzer profile export"):
        parse_profile_export(io.BytesIO(b'{"something": []}'))


def test_measured_windows_keep_the_last_three():
    wb = [0, 10, 20, 30, 40]  # 4 windows: the first is dropped
    reqs = [RequestRecord(s, s + 2) for s in (1, 12, 25, 33, 39)]
    e = ProfileExperiment("concurrency", 1, reqs, wb)
    assert [r.start_ns for r in e.measured()] == [12, 25, 33]


def test_within_budget_share():
    assert within_budget_share([5.0, 10.0, 20.0, 40.0], 10.0) == 0.5
    with pytest.raises(ValueError, match="budget_ms"):
        within_budget_share([1.0], 0)
    with pytest.raises(ValueError, match="no request latencies"):
        within_budget_share([], 10.0)


def _stats(inf, exe, ns=0):
    return ModelStats(inf, exe, inf, 0, ns, ns // 2, 0, ns // 2, 0)


def test_statistics_and_variant_usage_delta():
    before = {"a": _stats(10, 10), "b": _stats(5, 5)}
    after = {"a": _stats(40, 20, 30_000_000), "b": _stats(15, 15), "c": _stats(1, 1)}
    d = statistics_delta(before, after, ["a", "b"])
    assert d["a"].inference_count == 30 and d["a"].avg_batch_size == 3.0
    assert d["a"].avg_request_ms == pytest.approx(1.0)
    u = variant_usage_delta(before, after, ["a", "b", "missing"])
    assert u["a"]["share"] == pytest.approx(0.75) and u["b"]["inference_count"] == 10
    assert u["missing"]["inference_count"] == 0


def test_input_data_formats(tmp_path):
    p = write_bytes_input_data(tmp_path / "e.json", "IMAGE", [b"\xff\xd8jpeg"])
    step = json.loads(p.read_text())["data"][0]["IMAGE"]
    raw = base64.b64decode(step["b64"])
    assert raw[:4] == (6).to_bytes(4, "little") and raw[4:] == b"\xff\xd8jpeg" and step["shape"] == [1]
    t = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    p = write_tensor_input_data(tmp_path / "v.json", "input", [t])
    step = json.loads(p.read_text())["data"][0]["input"]
    assert np.frombuffer(base64.b64decode(step["b64"]), np.float32).tolist() == list(range(6))
    with pytest.raises(ValueError, match="float32"):
        write_tensor_input_data(tmp_path / "x.json", "input", [t.astype(np.float64)])
    with pytest.raises(ValueError, match="empty"):
        write_bytes_input_data(tmp_path / "x.json", "IMAGE", [b""])


def test_command_line_and_validation(tmp_path):
    cmd = perf_analyzer_command(
        "classifier",
        "127.0.0.1:8001",
        input_data=tmp_path / "in.json",
        report_csv="r.csv",
        concurrency=4,
        request_parameters={"variant": "mobilenet_v2_fp32", "latency_budget_ms": 30.0, "n": 2, "b": True},
    )
    params = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--request-parameter"]
    assert params == [
        "variant:mobilenet_v2_fp32:string",
        "latency_budget_ms:30.0:string",
        "n:2:int",
        "b:true:bool",
    ]
    assert cmd[cmd.index("--concurrency-range") + 1] == "4" and "--verbose-csv" in cmd
    assert "--async" not in cmd  # closed loop: each of the N in flight waits for its response
    rate = perf_analyzer_command("m", "h:1", input_data="x", report_csv="r.csv", request_rate=120.0)
    # open loop: requests leave on schedule even when the server lags (sync threads would wait for it)
    assert rate[rate.index("--request-rate-range") + 1] == "120" and "--async" in rate
    bad = [
        ({"concurrency": 0}, "concurrency"),
        ({"concurrency": 1, "request_rate": 2.0}, "exactly one"),
        ({"request_rate": -1.0}, "request_rate"),
        ({"concurrency": 1, "protocol": "http", "request_parameters": {"variant": "x"}}, "gRPC"),
        ({"concurrency": 1, "max_trials": 2}, "max_trials"),
        ({"concurrency": 1, "request_parameters": {"variant": "a:b"}}, "without ':'"),
    ]
    for kwargs, msg in bad:
        with pytest.raises(ValueError, match=msg):
            perf_analyzer_command("m", "h:1", input_data="x", report_csv="r.csv", **kwargs)


def test_targets_and_config_validation(tmp_path):
    names = [t.name for t in bench_targets(["v32", "v8"])]
    assert names == [
        "v32",
        "v8",
        "classifier[v32]",
        "classifier[v8]",
        "scheduler[v32]",
        "scheduler[v8]",
        "classifier[scheduler]",
    ]
    with_pipes = bench_targets(["v32", "v8"], pipelines=True)
    assert [t.name for t in with_pipes][2:4] == ["pipeline_v32", "pipeline_v8"]
    assert with_pipes[2].kind == "pipeline" and with_pipes[2].variant == "v32"
    sched = [t for t in bench_targets(["v32"]) if t.kind == "scheduler"]
    assert sched[0].model == "scheduler" and sched[0].request_parameters == {"variant": "v32"}
    ramp = ramp_targets(["v32"], 25.0)
    assert ramp[0].request_parameters == {"latency_budget_ms": 25.0} and ramp[1].request_parameters == {
        "variant": "v32"
    }
    with pytest.raises(ValueError, match="latency_budget_ms"):
        ramp_targets(["v32"], 0)
    (tmp_path / "manifest.json").write_text("{}")
    for kwargs, msg in [
        ({"concurrency": (0,)}, "concurrency"),
        ({"concurrency": ()}, "at least one"),
        ({"request_rates": (0.0,)}, "request rates"),
        ({"url": "http://x:8001"}, "host:port"),
        ({"n_images": 0}, "n_images"),
        ({"repo": tmp_path / "none"}, "manifest.json"),
    ]:
        with pytest.raises(ValueError, match=msg):
            BenchConfig(**{"repo": tmp_path, **kwargs}).validate()
    BenchConfig(repo=tmp_path).validate()


def test_serving_threads(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "config.pbtxt").write_text(
        'parameters {\n  key: "intra_op_num_threads"\n  value {\n    string_value: "3"\n  }\n}\n'
    )
    assert serving_threads(tmp_path, "v") == 3
    assert serving_threads(tmp_path, "missing") == 2


def test_ramp_pools_its_rounds():
    """Two rounds of one target at one level become one point: requests, latencies and variants pooled."""
    from types import SimpleNamespace

    from tcsched.client.perf_analyzer import ProfileExperiment, RequestRecord
    from tcsched.client.ramp import pool_runs
    from tests.helpers import make_manifest

    m = make_manifest({"v32": ("fp32", 0.0, {1: 5.0}), "v8": ("int8", 2.0, {1: 2.0})})

    def run(latencies_ms, variant, img_s, stable=True):
        reqs = [RequestRecord(0, int(ms * 1e6), {"VARIANT": variant}) for ms in latencies_ms]
        prof = ProfileExperiment("concurrency", 4, reqs, [])
        return SimpleNamespace(profile=prof, throughput_infer_per_s=img_s, stable=stable)

    p = pool_runs(
        "t", 4, [run([10, 20, 30], "v32", 100.0), run([40, 120], "v8", 50.0, stable=False)], m, 35.0
    )
    assert p.n_requests == 5 and p.served_by == {"v32": 3, "v8": 2}
    assert p.within_budget == pytest.approx(3 / 5)
    assert p.throughput_img_s == pytest.approx(75.0) and p.p50_ms == pytest.approx(30.0)
    assert p.served_agreement == pytest.approx((3 * 1.0 + 2 * 0.98) / 5)
    assert p.stable is False


def test_ramp_waits_for_the_server_queues_to_drain():
    """wait_idle polls Triton's nv_inference_pending_request_count (every model) until it is 0."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from tcsched.client.ramp import pending_requests, wait_idle

    def text(a, b):
        return (
            "# TYPE nv_inference_pending_request_count gauge\n"
            f'nv_inference_pending_request_count{{model="classifier",version="1"}} {a}\n'
            f'nv_inference_pending_request_count{{model="preprocess",version="1"}} {b}\n'
            'nv_inference_request_success{model="preprocess",version="1"} 7\n'
        )

    assert pending_requests(text(2, 3)) == 5 and pending_requests(text(0, 0)) == 0
    backlog = [text(4, 1), text(1, 0), text(0, 0)]
    served = []

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self):
            body = backlog[min(len(served), len(backlog) - 1)].encode()
            served.append(body)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        waited = wait_idle(f"http://127.0.0.1:{httpd.server_port}/metrics", timeout_s=10, poll_s=0.01)
        assert len(served) == 3 and waited < 10  # stopped at the first scrape with nothing pending
    finally:
        httpd.shutdown()
    assert wait_idle("http://127.0.0.1:9/metrics", timeout_s=5) < 5  # unreachable: nothing to wait on
