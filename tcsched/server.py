"""The embedded tritonserver: the binary and Python backend inside the ``nvidia-pytriton`` wheel (2.51.0).

The wheel's Python backend needs a ``triton_python_backend_stub`` built for the running Python next to
``libtriton_python.so``; :func:`backend_directory` assembles such a folder (links to the wheel's files plus the
stub for this Python's minor version) and :class:`TritonServer` starts the server with ``--backend-directory``.
The venv's ``bin`` goes first on PATH so the Python-backend models import this project and its dependencies.

Secure by default (README "Security"): the admin API groups :data:`ADMIN_APIS` answer only requests carrying
the header :data:`ADMIN_HEADER` with the server's admin key (a random one unless the operator sets it), a
watchdog reloads a model whose Python stub died, and :meth:`TritonServer.stop` ends within seconds and removes
this server's shared-memory regions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tcsched.server_watchdog import (  # noqa: F401 - re-exported: tcsched.server's public names
    SHM_DIR,
    SHM_REGION_PREFIX,
    ServerError,
    StubProcess,
    StubRecovery,
    StubWatchdog,
)

_FATAL_LOG_MARKERS = ("error while loading shared libraries", "failed to load all models", "Traceback")
log = logging.getLogger(__name__)

#: API groups of tritonserver 2.51's ``--http-restricted-api`` / ``--grpc-restricted-protocol`` (its --help)
TRITON_API_GROUPS = (
    "health",
    "metadata",
    "inference",
    "shared-memory",
    "model-config",
    "model-repository",
    "statistics",
    "trace",
    "logging",
)
#: Restricted to the admin key unless opened. shared-memory: a client registering the Python backend's own region
#: (its name is on the stub's command line) reads other requests' tensors or crashes the server (CVE-2025-23319;
#: system and CUDA shared memory are one group); model-repository loads and unloads models; logging and trace
#: change what the server writes. The other groups (health, metadata, inference, model-config, statistics) are
#: read-only or the service itself, and perf_analyzer needs model-config and statistics.
ADMIN_APIS = ("shared-memory", "model-repository", "logging", "trace")
#: HTTP header of the admin key. Triton prefixes the gRPC metadata key with ``triton-grpc-protocol-``
#: (server docs, customization_guide/inference_protocols.md, "Limit Endpoint Access").
ADMIN_HEADER = "tcsched-admin-key"
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
# an admin key: printable ASCII without spaces (a valid HTTP header value and gRPC metadata value), >= 16 chars
_KEY_RE = re.compile(r"[\x21-\x7e]{16,}")


def pytriton_root() -> Path:
    """``<site-packages>/pytriton/tritonserver`` (imports nothing from pytriton).

    Raises:
        FileNotFoundError: nvidia-pytriton is not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "nvidia-pytriton is not installed: `pip install 'tcsched[serve]'` (nvidia-pytriton==0.7.0)"
        )
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


def parse_open_apis(apis: str | Sequence[str] | None) -> tuple[str, ...]:
    """The admin API groups to open to every client: ``"shared-memory,logging"``, a sequence, or ``"all"``.

    Raises:
        ValueError: a name that is not one of :data:`ADMIN_APIS` (the other Triton groups are always open).
    """
    if not apis:
        return ()
    names = [a.strip() for a in (apis.split(",") if isinstance(apis, str) else apis) if a.strip()]
    if names == ["all"]:
        return ADMIN_APIS
    bad = [a for a in names if a not in ADMIN_APIS]
    if bad:
        always = [g for g in TRITON_API_GROUPS if g not in ADMIN_APIS]
        raise ValueError(
            f"unknown admin API group(s) {bad}: expected 'all' or a comma-separated subset of "
            f"{', '.join(ADMIN_APIS)} (always open: {', '.join(always)})"
        )
    return tuple(a for a in ADMIN_APIS if a in names)


@dataclass
class TritonServer(StubWatchdog):
    """A tritonserver process over ``model_repository``. Use as a context manager or call start()/stop().

    Ports default to Triton's (8000 HTTP, 8001 gRPC, 8002 metrics); pass 0 to pick free ones.

    Security (README "Security"): the groups :data:`ADMIN_APIS` minus ``open_apis`` need the header
    :data:`ADMIN_HEADER` (gRPC: :data:`GRPC_ADMIN_HEADER`) set to ``admin_key``; without an ``admin_key`` a
    random one is drawn that only this object knows (:meth:`admin_headers`). Models are loaded with
    ``--model-control-mode=explicit --load-model=*`` so that the watchdog (``watchdog=True``) can reload, through
    the restricted repository API, a model whose stub process died: every ``watchdog_interval_s`` it looks for
    dead stubs among tritonserver's children, then unloads the model (requests to it fail at once and
    /v2/health/ready turns false) and loads it again (:attr:`recoveries`).

    Raises (constructor):
        ValueError: an ``admin_key`` that is not >= 16 printable ASCII characters without spaces, or an unknown
            group in ``open_apis``.
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
    admin_key: str | None = field(default=None, repr=False)
    open_apis: Sequence[str] = ()
    watchdog: bool = True
    watchdog_interval_s: float = 0.5
    # tritonserver waits this long for in-flight requests (and open HTTP connections) on SIGTERM, then exits
    exit_timeout_s: int = 5
    # stop(): SIGKILL to the process group after this long
    stop_timeout_s: float = 8.0
    recoveries: list[StubRecovery] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.model_repository = Path(self.model_repository).resolve()
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        self.open_apis = parse_open_apis(self.open_apis)
        if self.admin_key is None:
            self.admin_key = secrets.token_urlsafe(32)
        elif not _KEY_RE.fullmatch(self.admin_key):
            raise ValueError(
                "the admin key must be at least 16 printable ASCII characters without spaces "
                f"(got {len(self.admin_key)} characters); e.g. "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        # this server's shared-memory regions: python_backend names them <prefix><uuid>
        self.shm_region_prefix = f"{SHM_REGION_PREFIX}tcsched-{secrets.token_hex(6)}-"
        self._watch_stop = threading.Event()
        self._watch_thread: threading.Thread | None = None
        # stub pid -> (model, shm region), learnt while the stub was alive
        self._stub_models: dict[int, tuple[str, str | None]] = {}

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def restricted_apis(self) -> tuple[str, ...]:
        """The admin groups that need the admin key: :data:`ADMIN_APIS` minus ``open_apis``."""
        return tuple(a for a in ADMIN_APIS if a not in self.open_apis)

    def admin_headers(self, protocol: str = "http") -> dict[str, str]:
        """Headers for the restricted APIs, e.g. ``client.unload_model(m, headers=server.admin_headers())``."""
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        return {ADMIN_HEADER if protocol == "http" else GRPC_ADMIN_HEADER: str(self.admin_key)}

    @property
    def model_control_mode(self) -> str:
        """tritonserver's ``--model-control-mode``: ``explicit`` unless ``extra_args`` sets another (its last
        occurrence wins, as in tritonserver's own option parsing)."""
        modes = [a.split("=", 1)[1] for a in self.extra_args if a.startswith("--model-control-mode=")]
        return modes[-1] if modes else "explicit"

    @property
    def watchdog_active(self) -> bool:
        """The stub watchdog runs: asked for, and the model control mode is ``explicit`` (it reloads a model
        through the repository API, which tritonserver serves only in that mode)."""
        return self.watchdog and self.model_control_mode == "explicit"

    def command(self) -> list[str]:
        root = pytriton_root()
        given = [a.split("=", 1)[0] for a in self.extra_args]
        # explicit model control: the watchdog reloads a model through the (restricted) repository API
        control = [] if "--model-control-mode" in given else ["--model-control-mode=explicit"]
        # --load-model is for explicit mode only (tritonserver 2.51 refuses it in the others)
        explicit = self.model_control_mode == "explicit"
        load = [] if "--load-model" in given or not explicit else ["--load-model=*"]
        restricted = []
        if self.restricted_apis:
            rule = f"{','.join(self.restricted_apis)}:{ADMIN_HEADER}={self.admin_key}"
            restricted = [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]
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
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_region_prefix}",
            *control,
            *load,
            *restricted,
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
                self.stop()  # its stubs and shared-memory regions
                raise ServerError(
                    f"tritonserver exited with code {self.process.returncode}:\n{self.log_tail()}"
                )
            if self.ready():
                if self.watchdog and not self.watchdog_active:
                    log.warning(
                        "stub watchdog off: it needs --model-control-mode=explicit, got %s",
                        self.model_control_mode,
                    )
                if self.watchdog_active:
                    self._watch_stop.clear()
                    self._learn_stubs()
                    self._watch_thread = threading.Thread(
                        target=self._watch, name=f"tcsched-watchdog-{self.http_port}", daemon=True
                    )
                    self._watch_thread.start()
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

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop the server and clean up after it; returns within about ``timeout_s`` + 2 s.

        SIGTERM to tritonserver (it drains in-flight requests for at most ``exit_timeout_s``, then finalizes the
        models and their stubs), SIGKILL to its process group after ``timeout_s`` (default ``stop_timeout_s``),
        then SIGKILL to any stub still in the group (tritonserver leaves them behind when its exit timeout
        expires or it is killed), then removes this server's shared-memory regions from /dev/shm.
        """
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        self.stop_watchdog()
        if self.process is not None:
            if self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver did not exit %.0f s after SIGTERM: SIGKILL", timeout_s)
            self._kill_group()
            self.remove_shm_regions()
        self._close_log()

    def stop_watchdog(self) -> None:
        """Stop the stub watchdog (a reload in progress is given 2 s to finish); the server keeps running."""
        self._watch_stop.set()
        if self._watch_thread is not None:
            self._watch_thread.join(timeout=2.0)
            self._watch_thread = None

    def _kill_group(self, wait_s: float = 2.0) -> None:
        """SIGKILL to every process left in tritonserver's process group (the server and its stubs)."""
        assert self.process is not None
        pgid = self.process.pid  # start_new_session: the server leads its own group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self.process.wait()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def _close_log(self) -> None:
        f = getattr(self, "_log", None)
        if f is not None and not f.closed:
            f.close()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
