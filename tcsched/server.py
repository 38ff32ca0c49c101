"""The embedded tritonserver: the binary and Python backend inside the ``nvidia-pytriton`` wheel (2.51.0).

The wheel's Python backend needs a ``triton_python_backend_stub`` built for the running Python next to
``libtriton_python.so``; :func:`backend_directory` assembles such a folder (links to the wheel's files plus the
stub for this Python's minor version) and :class:`TritonServer` starts the server with ``--backend-directory``.
The venv's ``bin`` goes first on PATH so the Python-backend models import this project and its dependencies.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

_FATAL_LOG_MARKERS = ("error while loading shared libraries", "failed to load all models", "Traceback")


class ServerError(RuntimeError):
    """The server could not start, or died; the message holds the tail of its log."""


def pytriton_root() -> Path:
    """``<site-packages>/pytriton/tritonserver`` (imports nothing from pytriton).

    Raises:
        FileNotFoundError: nvidia-pytriton is not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nvidia-pytriton is not installed: `pip install nvidia-pytriton==0.7.0`")
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise FileNotFoundError(f"no tritonserver binary under {root}")
    return root


def backend_directory(dest: str | os.PathLike | None = None) -> Path:
    """Build (idempotently) a backend folder ``<dest>/python/`` with the wheel's Python backend and the stub.

    Raises:
        FileNotFoundError: no stub for this Python version in the wheel.
    """
    root = pytriton_root()
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(f"nvidia-pytriton has no Python backend stub for Python {ver} ({stub})")
    dest = Path(dest) if dest else Path(sys.prefix) / "var" / "tcsched" / "backends"
    py = dest / "python"
    py.mkdir(parents=True, exist_ok=True)
    for src in (root / "backends" / "python").iterdir():
        if src.is_file():
            _copy_if_changed(src, py / src.name)
    _copy_if_changed(stub, py / stub.name)
    return dest


def _copy_if_changed(src: Path, dst: Path) -> None:
    if (
        dst.exists()
        and dst.stat().st_size == src.stat().st_size
        and dst.stat().st_mtime >= src.stat().st_mtime
    ):
        return
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TritonServer:
    """A tritonserver process over ``model_repository``. Use as a context manager or call start()/stop().

    Ports default to Triton's (8000 HTTP, 8001 gRPC, 8002 metrics); pass 0 to pick free ones.
    """

    model_repository: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_file: Path | None = None
    log_verbose: int = 0
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 180.0
    process: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        self.model_repository = Path(self.model_repository).resolve()
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        root = pytriton_root()
        return [
            str(root / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_directory()}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        # the stub's RPATH ($ORIGIN/../../../../nvidia_pytriton.libs) breaks once it is copied: name the folder
        libs = pytriton_root().parent.parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # the scheduler reads the upstream (preprocess) time from this server's own metrics endpoint
        env["TCSCHED_METRICS_URL"] = self.metrics_url
        # two cores: the Python-backend models' own math libraries must not start a thread per core each
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def start(self) -> TritonServer:
        """Start and wait until /v2/health/ready.

        Raises:
            FileNotFoundError: no model repository.
            ServerError: the server exited or was not ready in ``startup_timeout_s``.
        """
        if not (self.model_repository / "manifest.json").is_file():
            raise FileNotFoundError(
                f"{self.model_repository} is not a tcsched model repository (no manifest.json): run `tcsched build`"
            )
        from tcsched.manifest import Manifest

        manifest = Manifest.read(self.model_repository / "manifest.json")  # ValueError on a bad schema
        if manifest.target == "gpu":
            from tcsched.engine_compat import check_engine_compatibility

            try:
                check_engine_compatibility(manifest)
            except RuntimeError as e:
                raise ServerError(str(e)) from None
            if not (pytriton_root() / "backends" / "tensorrt").is_dir():
                raise ServerError(
                    "this repository holds TensorRT engines; the embedded tritonserver (nvidia-pytriton) has only "
                    "the Python backend: serve it with the official Triton container (docker/README.md)"
                )
        for port in (self.http_port, self.grpc_port, self.metrics_port):
            with socket.socket() as s:
                if s.connect_ex((self.host, port)) == 0:
                    raise ServerError(f"port {port} on {self.host} is already in use; choose another port")
        if self.log_file is None:
            self.log_file = (
                Path(os.environ.get("TMPDIR", "/tmp")) / f"tcsched-tritonserver-{self.http_port}.log"
            )
        self._log = open(self.log_file, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            start_new_session=True,
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._close_log()
                raise ServerError(
                    f"tritonserver exited with code {self.process.returncode}:\n{self.log_tail()}"
                )
            if self.ready():
                return self
            tail = self.log_tail(200)
            if any(marker in tail for marker in _FATAL_LOG_MARKERS):
                self.stop()
                raise ServerError(f"tritonserver failed to load the repository:\n{self.log_tail()}")
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"tritonserver not ready after {self.startup_timeout_s:.0f} s:\n{self.log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, n: int = 60) -> str:
        if self.log_file is None or not Path(self.log_file).exists():
            return ""
        return "\n".join(Path(self.log_file).read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (Triton drains in-flight requests), then SIGKILL after ``timeout_s``."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._close_log()

    def _close_log(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
