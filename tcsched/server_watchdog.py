"""The stub watchdog and the shared-memory cleanup of :class:`tcsched.server.TritonServer` (a mixin of it).

A Python-backend model instance runs in a ``triton_python_backend_stub`` process; when one dies, the watchdog
unloads and loads its model again (new instances, new stubs) and removes the dead stub's shared-memory region.
Re-exported by :mod:`tcsched.server`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# the logger of tcsched.server, whose TritonServer these methods are part of
log = logging.getLogger("tcsched.server")

#: python_backend's default region prefix ("triton_" + backend name + "_backend_shm_region_", python_be.cc); each
#: server extends it with its own token so that stop() removes exactly its own regions.
SHM_REGION_PREFIX = "triton_python_backend_shm_region_"
SHM_DIR = Path("/dev/shm")
_STUB_COMM = "triton_python_b"  # the stub's /proc comm: "triton_python_backend_stub" cut to 15 characters


class ServerError(RuntimeError):
    """The server could not start, or died; the message holds the tail of its log."""


@dataclass(frozen=True)
class StubProcess:
    """One ``triton_python_backend_stub``: a child of tritonserver, one per Python-backend model instance.

    ``state`` is /proc's (``S`` sleeping, ``R`` running, ``Z`` zombie: dead, not yet reaped by tritonserver,
    which reaps a stub only when it unloads the instance). ``model`` and ``region`` come from the stub's command
    line (``<stub> <repo>/<model>/<version>/model.py <shm region> ...``, python_backend stub_launcher.cc); a
    zombie has none, so they are None for it.
    """

    pid: int
    state: str
    model: str | None
    region: str | None

    @property
    def dead(self) -> bool:
        return self.state in ("Z", "X")


@dataclass
class StubRecovery:
    """The watchdog's reload of a model whose stub died. Times are ``time.monotonic()`` seconds."""

    model: str
    pid: int
    detected_at: float
    recovered_at: float | None = None
    error: str | None = None

    @property
    def seconds(self) -> float | None:
        """From detection to the model loaded again; None while running or after a failure."""
        return None if self.recovered_at is None else self.recovered_at - self.detected_at


class StubWatchdog:
    """The stub watchdog and the shared-memory cleanup of :class:`tcsched.server.TritonServer`: methods over its
    fields (``process``, ``host``, ``http_port``, ``shm_region_prefix``, ``recoveries``, ...)."""

    def shm_regions(self) -> list[Path]:
        """This server's Python-backend shared-memory regions (``/dev/shm/<shm_region_prefix><uuid>``)."""
        return sorted(SHM_DIR.glob(f"{self.shm_region_prefix}*"))

    def remove_shm_regions(self) -> list[Path]:
        """Remove this server's regions (once its stubs are gone); returns those removed."""
        removed = []
        for path in self.shm_regions():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        return removed

    # --- stub watchdog ------------------------------------------------------------------------------------------

    def stub_processes(self) -> list[StubProcess]:
        """The Python-backend stubs that are children of this tritonserver, read from /proc."""
        if self.process is None:
            return []
        out = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses
                comm = stat[stat.index("(") + 1 : stat.rindex(")")]
                state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
                if int(ppid) != self.process.pid or comm != _STUB_COMM:
                    continue
                argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue  # exited meanwhile
            model = region = None
            if len(argv) > 2 and argv[1]:
                model = Path(argv[1].decode(errors="replace")).parent.parent.name
                region = argv[2].decode(errors="replace")
            out.append(StubProcess(int(entry.name), state, model, region))
        return out

    def _learn_stubs(self) -> list[StubProcess]:
        """Scan the stubs; remember which model each live one serves (a dead one's command line is empty)."""
        stubs = self.stub_processes()
        for st in stubs:
            if st.model is not None:
                self._stub_models[st.pid] = (st.model, st.region)
        return stubs

    def _watch(self) -> None:
        handled: set[int] = set()
        while not self._watch_stop.wait(self.watchdog_interval_s):
            if not self.alive():
                return
            stubs = self._learn_stubs()
            for st in stubs:
                if not st.dead or st.pid in handled:
                    continue
                handled.add(st.pid)
                model, region = self._stub_models.get(st.pid, (None, None))
                if model is None:
                    # died before a scan saw it alive (e.g. right after a reload): the models with no live stub
                    live = {s.model for s in stubs if not s.dead}
                    orphans = sorted({m for m, _ in self._stub_models.values()} - live)
                    log.warning("stub %d died unseen; models without a live stub: %s", st.pid, orphans)
                    for m in orphans:
                        self._recover(m, st.pid)
                else:
                    self._recover(model, st.pid)
                # python_backend 24.10 never finishes unloading an instance whose stub died (the old version
                # stays "live" until the exit timeout), so its region would stay in /dev/shm until stop():
                # nothing opens a region by name once its stub has started, so the name can go now
                if region and "/" not in region and region.startswith(self.shm_region_prefix):
                    with contextlib.suppress(FileNotFoundError):
                        (SHM_DIR / region).unlink()
            live_pids = {st.pid for st in stubs}
            for pid in [p for p in self._stub_models if p not in live_pids]:
                del self._stub_models[pid]
                handled.discard(pid)

    def _recover(self, model: str, pid: int) -> None:
        """Unload ``model`` (its requests now fail at once instead of after python_backend's 1 s health wait,
        and strict readiness turns false), then load it again: new instances, new stubs."""
        rec = StubRecovery(model, pid, time.monotonic())
        self.recoveries.append(rec)
        log.warning("stub %d of model %s died: reloading the model", pid, model)
        try:
            self._repository_call(model, "unload")
            for attempt in range(3):
                try:
                    self._repository_call(model, "load")
                    break
                except ServerError:
                    if attempt == 2 or self._watch_stop.is_set():
                        raise
                    time.sleep(1.0)
            rec.recovered_at = time.monotonic()
            log.warning("model %s reloaded in %.1f s", model, rec.seconds)
        except (ServerError, OSError) as e:
            rec.error = str(e)
            log.error("could not reload model %s: %s", model, e)

    def _repository_call(self, model: str, action: str, timeout_s: float = 120.0) -> None:
        """POST /v2/repository/models/<model>/<action> with the admin key (model-repository extension).

        Raises:
            ServerError: the server refused (the message holds its answer).
        """
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else ("::1" if self.host == "::" else self.host)
        host = f"[{host}]" if ":" in host else host
        req = urllib.request.Request(
            f"http://{host}:{self.http_port}/v2/repository/models/{model}/{action}",
            data=b"{}",
            headers={"Content-Type": "application/json", **self.admin_headers()},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout_s):
                return
        except urllib.error.HTTPError as e:
            raise ServerError(
                f"{action} {model}: HTTP {e.code} {e.read()[:500].decode(errors='replace')}"
            ) from None
