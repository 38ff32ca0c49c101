"""Safe under hostile clients, the server side: restricted admin APIs, a stub watchdog, fast clean shutdown.

Against the real tritonserver (tcsched.server.TritonServer) and the real tritonclient. Tests that kill stub
processes start their own server on free ports, so the shared ``server`` fixture is never disturbed.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from multiprocessing import shared_memory
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from tritonclient.utils import InferenceServerException

from tcsched.client.classify import ClassifierClient
from tcsched.data import default_photo
from tcsched.manifest import Manifest
from tcsched.server import (
    ADMIN_APIS,
    ADMIN_HEADER,
    SHM_REGION_PREFIX,
    TritonServer,
    free_port,
    parse_open_apis,
)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
BIN = Path(sys.executable).parent
# a dead stub: service back (or ready=false) within this, half the liveness probe's 3 x 10 s (docker/k8s)
RECOVERY_LIMIT_S = 15.0
# stop(): SIGKILL after 8 s at the latest (exit timeout 5 s), inside the pod's 20 s termination grace
STOP_LIMIT_S = 10.0
FAST_FAIL_S = 0.5  # a request to a dead model must not wait for python_backend's 1 s stub health check


def http_call(server, path, body=None, headers=None, method=None):
    """(status, decoded body) of one raw HTTP request to the server."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://{server.http_url}{path}",
        data=data,
        headers={"Content-Type": "application/json", **(headers or {})},
        method=method or ("POST" if data is not None else "GET"),
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def classify_timed(url, params=None):
    """(seconds, served variant or None, error message or None) of one request through the ensemble."""
    t0 = time.monotonic()
    try:
        with ClassifierClient(url) as c:
            r = c.classify(default_photo("chelsea").read_bytes(), parameters=params or {})
        return time.monotonic() - t0, r.variant, None
    except Exception as e:  # noqa: BLE001 - the error is the measurement
        return time.monotonic() - t0, None, str(e)


def stub_of(server, model):
    live = [s for s in server.stub_processes() if s.model == model and not s.dead]
    assert len(live) == 1, f"expected one live stub of {model}: {server.stub_processes()}"
    return live[0]


def int8_variant(repo) -> str:
    m = Manifest.read(repo / "manifest.json")
    return next((v.name for v in m.variants if v.precision == "int8"), m.variants[-1].name)


# --- restricted by default -----------------------------------------------------------------------------------


def test_command_restricts_the_admin_groups_with_a_random_key(built_repo):
    a, b = TritonServer(built_repo, http_port=0), TritonServer(built_repo, http_port=0)
    cmd = a.command()
    rule = f"{','.join(ADMIN_APIS)}:{ADMIN_HEADER}={a.admin_key}"
    assert f"--http-restricted-api={rule}" in cmd and f"--grpc-restricted-protocol={rule}" in cmd
    assert len(a.admin_key) >= 32 and a.admin_key != b.admin_key
    assert a.admin_key not in repr(a)
    assert "--model-control-mode=explicit" in cmd and "--load-model=*" in cmd
    assert "--exit-timeout-secs=5" in cmd and "--http-address=127.0.0.1" in cmd
    assert f"--backend-config=python,shm-region-prefix-name={a.shm_region_prefix}" in cmd
    assert a.shm_region_prefix.startswith(SHM_REGION_PREFIX) and a.shm_region_prefix != b.shm_region_prefix
    # opening every group drops the flags; the caller's own model-control flags are not doubled
    opened = TritonServer(built_repo, open_apis="all", extra_args=["--model-control-mode=explicit"])
    assert not [c for c in opened.command() if "restricted" in c]
    assert opened.command().count("--model-control-mode=explicit") == 1
    with pytest.raises(ValueError, match="at least 16"):
        TritonServer(built_repo, admin_key="short")
    with pytest.raises(ValueError, match="always open: health"):
        parse_open_apis("inference")
    assert parse_open_apis(" logging,shared-memory ") == ("shared-memory", "logging")


def test_shared_memory_registration_is_refused(server):
    """The CVE-2025-23319 attack: register the Python backend's own region (its name is on the stub's command
    line) through the HTTP and gRPC shared-memory APIs, raw and through tritonclient."""
    region = stub_of(server, "scheduler").region
    assert region and (Path("/dev/shm") / region).exists()  # the target is real
    key = f"/{region}"
    code, body = http_call(
        server,
        f"/v2/systemsharedmemory/region/{region}/register",
        {"key": key, "offset": 0, "byte_size": 4096},
    )
    assert code == 403 and f"expecting header '{ADMIN_HEADER}'" in body
    code, body = http_call(
        server,
        "/v2/cudasharedmemory/region/x/register",
        {"raw_handle": {"b64": "AAAA"}, "device_id": 0, "byte_size": 64},
    )
    assert code == 403
    assert http_call(server, "/v2/systemsharedmemory/status")[0] == 403
    h = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        h.register_system_shared_memory("steal", key, 4096)
    g = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        g.register_system_shared_memory("steal", key, 4096)
    with pytest.raises(InferenceServerException, match="restricted"):
        g.get_system_shared_memory_status()
    h.close()
    g.close()
    seconds, variant, error = classify_timed(server.http_url)
    assert error is None and variant  # still serving


def test_logging_and_trace_apis_are_refused(server):
    assert http_call(server, "/v2/logging", {"log_verbose_level": 1})[0] == 403
    assert http_call(server, "/v2/logging", {"log_error": False})[0] == 403
    assert http_call(server, "/v2/logging")[0] == 403
    assert http_call(server, "/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]})[0] == 403
    g = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        g.update_log_settings({"log_verbose_level": 1})
    with pytest.raises(InferenceServerException, match="restricted"):
        g.get_trace_settings()
    g.close()
    # the launcher's own key opens them (read-only calls: the shared server is left as it is)
    assert http_call(server, "/v2/logging", headers=server.admin_headers())[0] == 200


def test_model_repository_api_needs_the_admin_key(server, built_repo):
    variant = int8_variant(built_repo)
    h = httpclient.InferenceServerClient(server.http_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        h.unload_model(variant)
    with pytest.raises(InferenceServerException, match="restricted"):
        h.get_model_repository_index()
    wrong = {ADMIN_HEADER: "x" * 43}
    assert http_call(server, f"/v2/repository/models/{variant}/unload", {}, headers=wrong)[0] == 403
    names = {m["name"] for m in h.get_model_repository_index(headers=server.admin_headers())}
    assert {"classifier", "scheduler", "preprocess", variant} <= names
    assert h.is_model_ready(variant)  # nothing was unloaded
    g = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        g.unload_model(variant)
    assert g.get_model_repository_index(headers=server.admin_headers("grpc")).models
    h.close()
    g.close()
    # the open groups stay open: health, metadata, model config, statistics (perf_analyzer needs the last two)
    for path in (
        "/v2/health/ready",
        "/v2/models/classifier",
        "/v2/models/classifier/config",
        "/v2/models/stats",
    ):
        assert http_call(server, path)[0] == 200, path


def test_open_apis_open_the_named_groups(built_repo):
    key = "operator-key-" + "k" * 20
    with TritonServer(
        built_repo,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        admin_key=key,
        open_apis=("shared-memory", "logging"),
    ) as s:
        region = shared_memory.SharedMemory(f"tcsched-test-{os.getpid()}", create=True, size=64)
        try:
            h = httpclient.InferenceServerClient(s.http_url)
            h.register_system_shared_memory("test", f"/{region.name}", 64)  # opened: no key needed
            assert [r["name"] for r in h.get_system_shared_memory_status()] == ["test"]
            h.unregister_system_shared_memory("test")
            h.close()
        finally:
            region.close()
            region.unlink()
        assert http_call(s, "/v2/logging")[0] == 200
        assert http_call(s, "/v2/repository/index", {})[0] == 403  # still restricted ...
        assert (
            http_call(s, "/v2/repository/index", {}, headers={ADMIN_HEADER: key})[0] == 200
        )  # ... to the key
        assert http_call(s, "/v2/trace/setting")[0] == 403


def test_serve_cli_options(built_repo):
    bad = subprocess.run(
        [str(BIN / "tcsched"), "serve", "--repo", str(built_repo), "--open-api", "inference"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert bad.returncode == 2 and "always open" in bad.stderr
    short = subprocess.run(
        [str(BIN / "tcsched"), "serve", "--repo", str(built_repo)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TCSCHED_ADMIN_KEY": "short", "COLUMNS": "400"},
    )
    assert short.returncode == 2 and "at least 16" in short.stderr
    ports = [free_port() for _ in range(3)]
    key = "cli-operator-key-0123456789"
    proc = subprocess.Popen(
        [str(BIN / "tcsched"), "serve", "--repo", str(built_repo), "--open-api", "logging"]
        + [f"--{p}-port={n}" for p, n in zip(("http", "grpc", "metrics"), ports, strict=True)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TCSCHED_ADMIN_KEY": key, "COLUMNS": "200"},
    )
    s = TritonServer(built_repo, http_port=ports[0])  # only for its http_url / ready()
    try:
        deadline = time.monotonic() + 120
        while not s.ready():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        assert http_call(s, "/v2/logging")[0] == 200
        assert http_call(s, "/v2/systemsharedmemory/status")[0] == 403
        assert http_call(s, "/v2/systemsharedmemory/status", headers={ADMIN_HEADER: key})[0] == 200
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        stop_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "shared-memory, model-repository, trace" in out and "open to every client: logging" in out
    assert key not in out
    assert stop_s < STOP_LIMIT_S, out


# --- a dead stub: recovered, and a dead model fails fast --------------------------------------------------------


@pytest.fixture(scope="module")
def watched(built_repo):
    with TritonServer(built_repo, http_port=0, grpc_port=0, metrics_port=0) as s:
        yield s


@pytest.mark.parametrize("which", ["scheduler", "preprocess", "variant"])
def test_killed_stub_is_recovered(watched, built_repo, which, record_property):
    """kill -9 of a stub while 3 clients send requests (forcing the variant when a variant's stub is killed)."""
    model = int8_variant(built_repo) if which == "variant" else which
    params = {"variant": model} if which == "variant" else None
    assert classify_timed(watched.http_url, params)[2] is None
    n = len(watched.recoveries)
    victim = stub_of(watched, model)
    samples = []  # (start, seconds, error) of every request, time.monotonic()
    done = threading.Event()

    def client():
        while not done.is_set():
            t = time.monotonic()
            seconds, _, error = classify_timed(watched.http_url, params)
            samples.append((t, seconds, error))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    t_kill = time.monotonic()
    os.kill(victim.pid, signal.SIGKILL)
    try:
        while True:
            seconds, variant, error = classify_timed(watched.http_url, params)
            if error is None and watched.ready() and time.monotonic() - t_kill > 0.5:
                break
            assert time.monotonic() - t_kill < RECOVERY_LIMIT_S, samples[-5:]
            time.sleep(0.05)
        back_s = time.monotonic() - t_kill
        time.sleep(0.5)
    finally:
        done.set()
        for t in threads:
            t.join(30)
    rec = watched.recoveries[n]
    assert rec.model == model and rec.pid == victim.pid and rec.error is None and rec.seconds is not None
    if which == "variant":
        assert variant == model  # the forced variant itself serves again
    failed = [(t - t_kill, s) for t, s, e in samples if e is not None]
    assert failed, "no request failed: the stub's death went unseen by the clients"
    # once the watchdog has unloaded the dead model (and the requests in flight there have had python_backend's
    # 1 s stub health wait), requests fail at once instead of after 1 s each
    late = [s for t, s, e in samples if e is not None and t > rec.detected_at + 1.1]
    assert all(s < FAST_FAIL_S for s in late), late
    slow = [s for _, s in failed if s >= FAST_FAIL_S]
    assert len(slow) <= 2 * len(threads), failed  # only the requests caught at the dead stub waited
    # once a request has been served after the reload, every later one is served: a forced variant stays refused
    # until a probe (one per LiveState.probe_interval_s, 1 s) finds it back, so the settle point is that success
    settled = min([t + s for t, s, e in samples if e is None and t > rec.recovered_at] + [t_kill + back_s])
    after = [(round(t - settled, 2), e[:120]) for t, _, e in samples if t > settled and e is not None]
    assert not after, after
    assert settled - rec.recovered_at < 1.5 + 0.5, (settled - rec.recovered_at, failed)
    assert stub_of(watched, model).pid != victim.pid
    assert not (Path("/dev/shm") / victim.region).exists()  # the dead stub's region is gone already
    record_property("recovery_s", round(back_s, 2))
    record_property("reload_s", round(rec.seconds, 2))
    print(
        f"{model}: served again {back_s:.2f} s after kill -9 (detected {rec.detected_at - t_kill:.2f} s, "
        f"reload {rec.seconds:.2f} s); {len(failed)} of {len(samples)} requests failed, {len(slow)} of them "
        f"slow (max {max(s for _, s in failed):.2f} s), {len(late)} failed after the unload "
        f"(max {max(late, default=0) * 1e3:.0f} ms)"
    )


def test_stop_after_stub_deaths_is_fast_and_leaves_no_region(built_repo):
    """One stub recovered by the watchdog, then one left dead (watchdog stopped): python_backend never finishes
    unloading such an instance, so tritonserver runs into its exit timeout; stop() still ends under 10 s and
    removes every region of this server."""
    s = TritonServer(built_repo, http_port=0, grpc_port=0, metrics_port=0).start()
    try:
        regions = s.shm_regions()
        assert len(regions) >= 6  # one per Python-backend model instance
        victim = stub_of(s, "preprocess")
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + RECOVERY_LIMIT_S
        while not (s.recoveries and s.recoveries[0].recovered_at):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        s.stop_watchdog()  # no recovery for the next one
        os.kill(stub_of(s, "scheduler").pid, signal.SIGKILL)
        time.sleep(0.5)
    finally:
        t0 = time.monotonic()
        s.stop()
        stop_s = time.monotonic() - t0
    print(f"stop after two stub deaths: {stop_s:.2f} s")
    assert stop_s < STOP_LIMIT_S
    assert s.shm_regions() == [] and not [r for r in regions if r.exists()]
    assert not s.stub_processes()
    with pytest.raises(ProcessLookupError):
        os.killpg(s.process.pid, 0)  # no process of the group is left


def test_without_watchdog_the_probe_tells_the_truth(built_repo):
    """What the container sees (no launcher in front of Triton): after a stub's death Triton's health stays
    200 while every request fails; the probe of compose.yaml / deployment.yaml fails."""
    probe = [sys.executable, str(DOCKER / "probe.py")]
    with TritonServer(built_repo, http_port=0, grpc_port=0, metrics_port=0, watchdog=False) as s:
        ok = subprocess.run([*probe, "--url", s.http_url], capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0 and "served by mobilenet_v2_" in ok.stdout, ok.stderr
        os.kill(stub_of(s, "scheduler").pid, signal.SIGKILL)
        time.sleep(0.5)
        assert s.ready()  # Triton's own readiness does not notice
        bad = subprocess.run([*probe, "--url", s.http_url], capture_output=True, text=True, timeout=30)
        assert bad.returncode == 1 and "is not healthy" in bad.stderr, bad.stdout + bad.stderr
        assert not s.recoveries
        t0 = time.monotonic()
    assert time.monotonic() - t0 < STOP_LIMIT_S
    assert s.shm_regions() == []


# --- the container: entrypoint flags, Dockerfile, compose, Kubernetes ------------------------------------------

FAKE = {
    # FAKE tools: the GPU-only steps of docker/entrypoint.sh (TensorRT engines) cannot run here; the fake
    # tritonserver prints the arguments the entrypoint would exec it with.
    "python3": "#!/bin/sh\necho cc90-trt10.5.0\n",
    "tcsched": "#!/bin/sh\nexit 0\n",
    "tritonserver": '#!/bin/sh\nfor a in "$@"; do echo "ARG $a"; done\n',
}


def run_entrypoint(tmp_path, **env):
    fake = tmp_path / "fakebin"
    fake.mkdir(exist_ok=True)
    for name, text in FAKE.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    cpu = tmp_path / "cpu"
    cpu.mkdir(exist_ok=True)
    (cpu / "manifest.json").write_text("{}")
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir(exist_ok=True)
    (shm_dir / f"{SHM_REGION_PREFIX}stale").write_bytes(b"x")
    (shm_dir / "other").write_bytes(b"x")
    out = subprocess.run(
        ["bash", str(DOCKER / "entrypoint.sh"), "--log-verbose=1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": f"{fake}:/usr/bin:/bin",
            "TCSCHED_CPU_REPO": str(cpu),
            "TCSCHED_ENGINE_DIR": str(tmp_path / "engines"),
            "TCSCHED_SHM_DIR": str(shm_dir),
            **env,
        },
    )
    args = [line[4:] for line in out.stdout.splitlines() if line.startswith("ARG ")]
    return out, args, shm_dir


def restricted_rules(args):
    return {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if "restricted" in a}


def test_entrypoint_restricts_the_admin_apis(tmp_path):
    out, args, shm_dir = run_entrypoint(tmp_path)
    assert out.returncode == 0, out.stderr
    rules = restricted_rules(args)
    groups = ",".join(ADMIN_APIS)
    http_rule = rules["--http-restricted-api"]
    assert http_rule == rules["--grpc-restricted-protocol"]
    m = re.fullmatch(rf"{groups}:{ADMIN_HEADER}=([A-Za-z0-9]+)", http_rule)
    assert m and len(m.group(1)) >= 32 and m.group(1) not in out.stdout.replace(http_rule, "")
    again = restricted_rules(run_entrypoint(tmp_path)[1])
    assert again["--http-restricted-api"] != http_rule  # a new random key per start
    assert (
        "--http-address=0.0.0.0" in args and "--exit-timeout-secs=5" in args and args[-1] == "--log-verbose=1"
    )
    assert not (shm_dir / f"{SHM_REGION_PREFIX}stale").exists() and (shm_dir / "other").exists()


def test_entrypoint_key_and_open_groups(tmp_path):
    key = "operator-" + "z" * 20
    out, args, _ = run_entrypoint(tmp_path, TCSCHED_ADMIN_KEY=key, TCSCHED_OPEN_APIS="shared-memory,logging")
    assert out.returncode == 0, out.stderr
    assert restricted_rules(args)["--http-restricted-api"] == f"model-repository,trace:{ADMIN_HEADER}={key}"
    assert "open to every client: shared-memory,logging" in out.stdout
    out, args, _ = run_entrypoint(tmp_path, TCSCHED_OPEN_APIS="all")
    assert out.returncode == 0 and not restricted_rules(args)
    out, _, _ = run_entrypoint(tmp_path, TCSCHED_OPEN_APIS="inference")
    assert out.returncode == 2 and "unknown group 'inference'" in out.stderr
    out, _, _ = run_entrypoint(tmp_path, TCSCHED_ADMIN_KEY="short")
    assert out.returncode == 2 and ">= 16" in out.stderr


def test_dockerfile_and_entrypoint_lint_clean():
    for tool, target in (("hadolint", DOCKER / "Dockerfile"), ("shellcheck", DOCKER / "entrypoint.sh")):
        exe = BIN / tool
        assert exe.is_file(), f"{tool} missing: pip install -e '.[dev]'"
        out = subprocess.run([str(exe), str(target)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
    text = (DOCKER / "Dockerfile").read_text()
    assert "COPY docker/probe.py /usr/local/bin/tcsched-probe" in text and "HEALTHCHECK" in text


def test_kubernetes_manifest_and_compose():
    docs = list(yaml.safe_load_all((DOCKER / "k8s" / "deployment.yaml").read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    service = next(d for d in docs if d["kind"] == "Service")
    for d in (deployment, service):
        assert {"apiVersion", "kind", "metadata", "spec"} <= d.keys() and d["metadata"]["name"] == "tcsched"
    pod = deployment["spec"]["template"]["spec"]
    assert (
        deployment["spec"]["selector"]["matchLabels"] == deployment["spec"]["template"]["metadata"]["labels"]
    )
    (c,) = pod["containers"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["exec"]["command"] == ["/usr/local/bin/tcsched-probe"], probe
        assert c[probe]["timeoutSeconds"] >= 5
    key_env = next(e for e in c["env"] if e["name"] == "TCSCHED_ADMIN_KEY")
    assert key_env["valueFrom"]["secretKeyRef"]["optional"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["terminationGracePeriodSeconds"] > 5 + 2  # the exit timeout plus the stop
    ports = {p["name"] for p in c["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports

    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    svc = compose["services"]["tcsched"]
    assert all(p.startswith("${TCSCHED_BIND:-127.0.0.1}:") for p in svc["ports"]), svc["ports"]
    assert svc["healthcheck"]["test"] == ["CMD", "/usr/local/bin/tcsched-probe"]
    assert "TCSCHED_ADMIN_KEY" in svc["environment"]
    assert (DOCKER / "compose.yaml").read_text().count("tcsched-engines") >= 2


def test_probe_reports_the_served_variant(server):
    out = subprocess.run(
        [sys.executable, str(DOCKER / "probe.py"), "--url", server.http_url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and re.search(r"served by mobilenet_v2_\w+", out.stdout), out.stderr
    dead = subprocess.run(
        [sys.executable, str(DOCKER / "probe.py"), "--url", f"127.0.0.1:{free_port()}", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert dead.returncode == 1 and "no answer" in dead.stderr
