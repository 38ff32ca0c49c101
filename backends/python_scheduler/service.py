"""Execution scheduling: one scheduler ``execute`` call as plain Python.

``model.py`` hands over the batch of Triton requests as (parameters, input array) pairs and an ``infer`` callable
that runs a variant by BLS; this module groups requests with the same options, decides once per group
(batch-level decisions), concatenates their inputs into one BLS call, splits the logits back, and falls back
once to the next-ranked variant when a variant fails. Errors are returned per request, never raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tcsched.scheduler.policy import Decision, Policy, RequestError, RequestOptions, parse_parameters

log = logging.getLogger(__name__)

InferFn = Callable[[str, np.ndarray], np.ndarray]


@dataclass
class Served:
    """The answer to one request: logits float32 [B, classes] and the decision that produced them."""

    logits: np.ndarray
    decision: Decision
    fallback_from: str | None = None
    infer_ms: float = 0.0


class SchedulerService:
    def __init__(self, policy: Policy, defaults: RequestOptions, infer: InferFn, max_attempts: int = 2):
        self.policy = policy
        self.defaults = defaults
        self.infer = infer
        self.max_attempts = max_attempts
        self.fallbacks = 0

    def handle(self, requests: Sequence[tuple[Mapping[str, object], np.ndarray]]) -> list[Served | Exception]:
        """Serve a batch of requests; element ``i`` of the result answers request ``i``.

        Each request is (Triton request parameters, float32 [B_i, 3, 224, 224]). An element is an Exception
        (``RequestError`` for bad parameters, ``RuntimeError`` when every attempt failed) for that request only.
        """
        out: list[Served | Exception | None] = [None] * len(requests)
        groups: dict[RequestOptions, list[int]] = {}
        for i, (params, _x) in enumerate(requests):
            try:
                opts = parse_parameters(params, self.defaults)
            except RequestError as e:
                out[i] = e
                continue
            groups.setdefault(opts, []).append(i)

        for opts, idx in groups.items():
            batch = requests[idx[0]][1] if len(idx) == 1 else np.concatenate([requests[i][1] for i in idx])
            try:
                ranked = self.policy.rank(opts, batch_size=len(batch))
            except RequestError as e:
                for i in idx:
                    out[i] = e
                continue
            attempts = ranked[: 1 if opts.variant is not None else self.max_attempts]
            errors: list[str] = []
            for k, decision in enumerate(attempts):
                t0 = time.perf_counter()
                try:
                    logits = self.infer(decision.variant, batch)
                except Exception as e:  # a failing variant must not fail the request while another can serve
                    errors.append(f"{decision.variant}: {e}")
                    self.policy.state.mark_unhealthy(decision.variant)
                    log.warning("variant %s failed (%s); marked unhealthy", decision.variant, e)
                    continue
                ms = (time.perf_counter() - t0) * 1e3
                if k > 0:
                    self.fallbacks += 1
                start = 0
                for i in idx:
                    n = len(requests[i][1])
                    out[i] = Served(
                        logits[start : start + n], decision, attempts[0].variant if k else None, ms
                    )
                    start += n
                break
            else:
                err = RuntimeError("every attempted variant failed: " + "; ".join(errors))
                for i in idx:
                    out[i] = err
        return out  # type: ignore[return-value]
