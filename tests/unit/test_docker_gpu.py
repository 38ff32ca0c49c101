"""The container's GPU steps without Docker or a GPU: the image's TensorRT release check (docker/check_tensorrt.sh,
run by the Dockerfile), the Dockerfile itself (hadolint, what the final stage installs) and the engine folder key
of docker/entrypoint.sh. FAKE python3 / tcsched / tritonserver executables stand in for the image's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parents[2] / "docker"
BIN = Path(sys.executable).parent


def _fake_bin(tmp_path: Path, **scripts: str) -> Path:
    fake = tmp_path / "fakebin"
    fake.mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    return fake


def _check(tmp_path: Path, expected: str, libs: list[str], python_version: str | None):
    lib_dir = tmp_path / "lib"
    lib_dir.mkdir(parents=True, exist_ok=True)
    for name in libs:
        (lib_dir / name).write_bytes(b"")
    py = f"#!/bin/sh\necho {python_version}\n" if python_version else "#!/bin/sh\nexit 1\n"
    fake = _fake_bin(tmp_path, python3=py)  # FAKE python3: prints tensorrt.__version__
    return subprocess.run(
        ["bash", str(DOCKER / "check_tensorrt.sh"), expected],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": f"{fake}:/usr/bin:/bin", "TCSCHED_LIBNVINFER_DIRS": f"{lib_dir} {tmp_path / 'none'}"},
    )


def test_tensorrt_check_passes_only_on_one_release(tmp_path):
    ok = _check(tmp_path, "10.5.0", ["libnvinfer.so.10.5.0", "libnvinfer_plugin.so.10.5.0"], "10.5.0")
    assert ok.returncode == 0, ok.stderr
    assert "libnvinfer.so.10.5.0 (10.5.0); tensorrt (Python): 10.5.0" in ok.stdout
    assert (
        _check(tmp_path / "b", "10.5.0", ["libnvinfer.so.10.5.0"], "10.5.0.18").returncode == 0
    )  # same release


def test_tensorrt_check_fails_without_libnvinfer(tmp_path):
    out = _check(tmp_path, "10.5.0", ["libnvinfer_plugin.so.10.5.0", "libnvinfer.so.10"], "10.5.0")
    assert out.returncode == 1 and "no libnvinfer.so.<version>" in out.stderr


@pytest.mark.parametrize(
    ("lib", "py"), [("libnvinfer.so.10.6.0", "10.5.0"), ("libnvinfer.so.10.5.0", "10.4.0")]
)
def test_tensorrt_check_fails_on_a_mismatch(tmp_path, lib, py):
    out = _check(tmp_path, "10.5.0", [lib], py)
    assert out.returncode == 1 and "TensorRT mismatch" in out.stderr


def test_tensorrt_check_fails_without_the_python_package(tmp_path):
    out = _check(tmp_path, "10.5.0", ["libnvinfer.so.10.5.0"], None)
    assert out.returncode == 1 and "does not import" in out.stderr


def test_container_files_lint_clean():
    for tool, target in (
        ("hadolint", DOCKER / "Dockerfile"),
        ("shellcheck", DOCKER / "check_tensorrt.sh"),
        ("shellcheck", DOCKER / "entrypoint.sh"),
    ):
        exe = BIN / tool
        assert exe.is_file(), f"{tool} missing: pip install -e '.[dev]'"
        out = subprocess.run([str(exe), str(target)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_final_stage_runs_engines_without_torch():
    text = (DOCKER / "Dockerfile").read_text()
    final = text.split("\nFROM ${TRITON_IMAGE}\n", 1)[1]  # the server stage
    assert "RUN chmod 0755 /usr/local/bin/tcsched-check-tensorrt" in final
    assert '/usr/local/bin/tcsched-check-tensorrt "${TENSORRT_VERSION}"' in final
    assert (
        re.search(r'"cuda-python==\$\{CUDA_PYTHON_VERSION\}"', final)
        and "ARG CUDA_PYTHON_VERSION=12.6" in final
    )
    runs = re.split(r"\n(?=[A-Z]+ )", final)  # one Dockerfile instruction each, continuation lines kept
    installs = [i for i in runs if i.startswith("RUN ") and "pip install" in i]
    assert installs and not any("torch" in i or "[build]" in i for i in installs)  # no torch in the server
    assert "sys.modules['torch'] = None; import tcsched.build_tools.gpu_repository" in final
    # the security settings stay: probe as health check, entrypoint (restricted APIs, exit timeout) in front
    assert (
        'HEALTHCHECK --interval=10s --timeout=5s --start-period=15m --retries=3 CMD ["/usr/local/bin/tcsched-probe"]'
        in final
    )
    assert 'ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "/usr/local/bin/tcsched-entrypoint"]' in final


def _entrypoint(tmp_path: Path, **env: str):
    calls = tmp_path / "tcsched-args"
    fake = _fake_bin(
        tmp_path,
        python3="#!/bin/sh\necho cc90-trt10.5.0\n",  # FAKE: the GPU identity the image's python3 would print
        tcsched=f'#!/bin/sh\nfor a in "$@"; do echo "$a"; done > {calls}\n',
        tritonserver='#!/bin/sh\nfor a in "$@"; do echo "ARG $a"; done\n',
    )
    cpu = tmp_path / "cpu"
    cpu.mkdir(exist_ok=True)
    (cpu / "manifest.json").write_text("{}")
    (tmp_path / "shm").mkdir(exist_ok=True)
    out = subprocess.run(
        ["bash", str(DOCKER / "entrypoint.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": f"{fake}:/usr/bin:/bin",
            "TCSCHED_CPU_REPO": str(cpu),
            "TCSCHED_ENGINE_DIR": str(tmp_path / "engines"),
            "TCSCHED_SHM_DIR": str(tmp_path / "shm"),
            **env,
        },
    )
    args = calls.read_text().splitlines() if calls.is_file() else []
    return out, args


def test_entrypoint_keys_the_engine_folder_by_the_cuda_graph_setting(tmp_path):
    repos = {}
    for graphs, flag in (("1", "--cuda-graphs"), ("0", "--no-cuda-graphs")):
        out, args = _entrypoint(tmp_path / graphs, TCSCHED_CUDA_GRAPHS=graphs)
        assert out.returncode == 0, out.stderr
        assert args[0] == "engines" and flag in args and "--if-missing" in args
        repos[graphs] = args[args.index("--output") + 1]
        served = next(a for a in out.stdout.splitlines() if a.startswith("ARG --model-repository="))
        assert served == f"ARG --model-repository={repos[graphs]}"
        assert "--exit-timeout-secs=5" in out.stdout and "--http-restricted-api=" in out.stdout
    assert "/cc90-trt10.5.0-graphs1-" in repos["1"] and "/cc90-trt10.5.0-graphs0-" in repos["0"]
    out, args = _entrypoint(tmp_path / "bad", TCSCHED_CUDA_GRAPHS="yes")
    assert out.returncode == 2 and "must be 1 or 0" in out.stderr and args == []
