"""Client side: classify encoded images through a tcsched ensemble with tritonclient (HTTP or gRPC): ``classifier``
(:data:`MODEL`) unless the repository was built with another name (``tcsched build --ensemble-name``,
``manifest.ensemble``).

Request knobs travel as Triton request parameters (``variant``, ``min_agreement``, ``accuracy_budget``,
``latency_budget_ms``, ``objective``); the top-k comes from Triton's classification extension (``class_count``), as
``"score:index:label"`` strings.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from tcsched.names import DECISION, ENSEMBLE, IMAGE, LOGITS, VARIANT

Protocol = Literal["http", "grpc"]
MODEL = ENSEMBLE  # the default ensemble name (tcsched.names.ENSEMBLE)


@dataclass(frozen=True)
class Prediction:
    """One class of a top-k: ``index`` in ImageNet-1k, ``label`` name, ``score`` (the logit)."""

    index: int
    label: str
    score: float


@dataclass(frozen=True)
class Classification:
    """The answer for one image: top-k predictions, the variant that served it, client-side latency (ms)."""

    topk: list[Prediction]
    variant: str
    latency_ms: float
    decision: dict | None = (
        None  # the scheduler's DECISION output: reason, code, cascade, escalated, margin, ...
    )

    @property
    def escalated(self) -> bool:
        """Whether a confidence cascade re-ran this image on a later stage."""
        return bool((self.decision or {}).get("escalated"))


def parse_class_entry(entry: bytes | str) -> Prediction:
    """Parse one classification-extension string ``"score:index:label"`` (the label may contain ':')."""
    s = entry.decode() if isinstance(entry, bytes) else entry
    score, index, label = s.split(":", 2)
    return Prediction(int(index), label, float(score))


#: Triton's default ports (tritonserver --http-port / --grpc-port)
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}
_SCHEMES = {"http": ("http://",), "grpc": ("grpc://", "http://")}


class ServerUnavailable(ConnectionError):
    """No ready ensemble at the address: the server is unreachable, or up without the model asked for ready."""


def server_address(url: str | None, protocol: Protocol = "http") -> str:
    """``host:port`` for tritonclient from what a user types: ``host:port``, ``host`` (Triton's default port
    of ``protocol``: :data:`DEFAULT_PORTS`), ``[::1]:8000``, with or without ``http://`` (``grpc://`` for
    gRPC) and a trailing ``/``; ``None``: ``127.0.0.1`` on the default port.

    Raises:
        ValueError: another scheme (``https://``: tritonclient needs its ssl options, not set here), a path, or a
            port that is not a number in 1..65535; the message shows the expected form.
    """
    if protocol not in DEFAULT_PORTS:
        raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
    default = DEFAULT_PORTS[protocol]
    if url is None or not url.strip():
        return f"127.0.0.1:{default}"
    text = url.strip()
    expected = f"expected host:port, e.g. 127.0.0.1:{default} ({protocol})"
    for scheme in _SCHEMES[protocol]:
        if text.lower().startswith(scheme):
            text = text[len(scheme) :]
            break
    else:
        if "://" in text:
            raise ValueError(f"unsupported scheme in {url!r} for {protocol}: {expected}")
    text = text.rstrip("/")
    if not text or "/" in text:
        raise ValueError(f"{url!r} is not a server address: {expected}")
    if text.startswith("["):  # [IPv6]:port
        host, _, rest = text.partition("]")
        host += "]"
        port = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"{url!r} is not a server address: {expected}")
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif ":" in text:
        raise ValueError(f"{url!r}: write an IPv6 address in brackets, [::1]:{default}")
    else:
        host, port = text, ""
    if not host:
        raise ValueError(f"{url!r} has no host: {expected}")
    if port == "":
        return f"{host}:{default}"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} of {url!r} is not a number in 1..65535: {expected}")
    return f"{host}:{int(port)}"


class ClassifierClient:
    """A tritonclient connection to the ensemble. ``url``: see :func:`server_address` (``host:port``; 8000 HTTP,
    8001 gRPC by default).

    Raises (constructor):
        ValueError: a bad ``protocol`` or ``url``.
    """

    def __init__(
        self,
        url: str = "127.0.0.1:8000",
        protocol: Protocol = "http",
        model: str = MODEL,
        timeout_s: float = 60.0,
        concurrency: int = 1,
    ):
        url = server_address(url, protocol)  # checked before tritonclient sees it
        self.url = url
        self.protocol = protocol
        self.model = model
        self.timeout_s = timeout_s
        if protocol == "http":
            import tritonclient.http as tc

            self._client = tc.InferenceServerClient(
                url, concurrency=max(1, concurrency), connection_timeout=timeout_s, network_timeout=timeout_s
            )
        else:
            import tritonclient.grpc as tc

            self._client = tc.InferenceServerClient(url)
        self._tc = tc

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ClassifierClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ready(self) -> bool:
        try:
            return bool(self._client.is_model_ready(self.model))
        except Exception:  # noqa: BLE001 - not ready is the answer for any connection failure
            return False

    def served_models(self) -> list[str] | None:
        """The names of the models the server has loaded, sorted: from Triton's repository index (state
        ``READY``), or, where that API is restricted (``tcsched serve`` keeps the ``model-repository`` group
        behind its admin key), from the statistics extension, which lists every loaded model; ``None`` when the
        server answers neither."""
        try:
            index = self._client.get_model_repository_index()
        except Exception:  # noqa: BLE001 - restricted or unsupported: the statistics next
            index = None
        if index is not None:
            # HTTP: a list of {"name", "version", "state"}; gRPC: a RepositoryIndexResponse
            rows = (
                index
                if isinstance(index, list)
                else [{"name": m.name, "state": m.state} for m in index.models]
            )
            return sorted({e.get("name", "") for e in rows if e.get("state") == "READY"})
        try:
            stats = self._client.get_inference_statistics()  # every loaded model (model_name "")
        except Exception:  # noqa: BLE001 - a server without the statistics extension: nothing to list
            return None
        if not isinstance(stats, dict):  # gRPC: a ModelStatisticsResponse
            return sorted({m.name for m in stats.model_stats})
        return sorted({m.get("name", "") for m in stats.get("model_stats", [])})

    def check_ready(self) -> None:
        """Raise unless the server answers and its model ``self.model`` is ready.

        Raises:
            ServerUnavailable: the message says which: nothing answers at the address (over this protocol), or
                the server is up without a ready model ``self.model``; then it lists the models that are ready
                there (a repository built with ``--ensemble-name`` serves its ensemble under that name).
        """
        where = f"{self.url} ({self.protocol})"
        try:
            live = self._client.is_server_live()
        except Exception as e:  # noqa: BLE001 - refused, timed out, not a Triton endpoint of this protocol
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            raise ServerUnavailable(
                f"no Triton server answers at {where}: {reason}; start one with `tcsched serve` "
                f"(HTTP on port {DEFAULT_PORTS['http']}, gRPC on {DEFAULT_PORTS['grpc']} by default)"
            ) from None
        if not live or not self.ready():
            models = self.served_models() if live else None
            there = ""
            if models is not None:
                there = f"; ready there: {', '.join(models)}" if models else "; no model is ready there"
            raise ServerUnavailable(
                f"the server at {where} has no ready model {self.model!r}{there}; name the ensemble with "
                "`tcsched classify --model NAME` (the repository manifest's `ensemble`), or serve a tcsched "
                "repository (`tcsched serve --repo R`)"
            )

    def classify(
        self, image: bytes, top_k: int = 5, parameters: Mapping[str, object] | None = None
    ) -> Classification:
        """Classify one encoded image (JPEG/PNG bytes).

        Raises:
            tritonclient.utils.InferenceServerException: the server's per-request error (bad image, bad parameter).
            ValueError: ``top_k`` outside [1, 1000].
        """
        if not 1 <= top_k <= 1000:
            raise ValueError(f"top_k must be in [1, 1000], got {top_k}")
        tc = self._tc
        inp = tc.InferInput(IMAGE, [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[image]], dtype=np.object_))
        outputs = [
            tc.InferRequestedOutput(LOGITS, class_count=top_k),
            tc.InferRequestedOutput(VARIANT),
            tc.InferRequestedOutput(DECISION),
        ]
        kw = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        t0 = time.perf_counter()
        result = self._client.infer(
            self.model, [inp], outputs=outputs, parameters=dict(parameters or {}), **kw
        )
        ms = (time.perf_counter() - t0) * 1e3
        entries = result.as_numpy(LOGITS).reshape(-1)
        variant = result.as_numpy(VARIANT).reshape(-1)[0]
        decision = result.as_numpy(DECISION)
        return Classification(
            [parse_class_entry(e) for e in entries],
            variant.decode() if isinstance(variant, bytes) else str(variant),
            ms,
            json.loads(decision.reshape(-1)[0]) if decision is not None else None,
        )

    def classify_many(
        self,
        images: Sequence[bytes],
        top_k: int = 5,
        parameters: Mapping[str, object] | None = None,
        concurrency: int = 4,
        on_done: Callable[[], None] | None = None,
    ) -> list[Classification | Exception]:
        """Classify many images with ``concurrency`` requests in flight; errors are returned in place.
        ``on_done`` is called after each image (progress).

        tritonclient's clients are not thread-safe: each worker thread opens its own connection.
        """
        local = threading.local()
        opened: list[ClassifierClient] = []
        lock = threading.Lock()

        def one(img: bytes) -> Classification | Exception:
            client = getattr(local, "client", None)
            if client is None:
                client = local.client = ClassifierClient(self.url, self.protocol, self.model, self.timeout_s)
                with lock:
                    opened.append(client)
            try:
                return client.classify(img, top_k, parameters)
            except Exception as e:  # noqa: BLE001 - returned per image
                return e
            finally:
                if on_done is not None:
                    on_done()

        try:
            with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
                return list(pool.map(one, images))
        finally:
            for c in opened:
                c.close()


def compute_ns(client: ClassifierClient, models: Sequence[str]) -> dict[str, tuple[int, int, int]]:
    """Triton's cumulative statistics of ``models``: (compute_infer ns, inference count, execution count) each.

    ``compute_infer`` is the time a model's backend spent executing (Triton's statistics extension,
    docs/protocol/extension_statistics.md); ``inference_count`` counts batch rows and ``execution_count`` the
    executions (calls of the backend, one per batch). Deltas between two calls give a configuration's own compute
    time, rows and calls.
    """
    out: dict[str, tuple[int, int, int]] = {}
    for name in models:
        stats = client._client.get_inference_statistics(model_name=name)
        if client.protocol == "grpc":
            from google.protobuf.json_format import MessageToDict

            stats = MessageToDict(stats, preserving_proto_field_name=True)
        ns = count = calls = 0
        for m in stats.get("model_stats", []):
            ns += int(m.get("inference_stats", {}).get("compute_infer", {}).get("ns", 0))
            count += int(m.get("inference_count", 0))
            calls += int(m.get("execution_count", 0))
        out[name] = (ns, count, calls)
    return out
