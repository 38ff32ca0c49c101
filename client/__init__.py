"""Triton clients and load tools (import path ``tcsched.client``, folder client/): classification through
tritonclient (``classify``), perf_analyzer as a library (``perf_analyzer``), ``tcsched bench`` (``bench`` with
``targets``, ``pipelines``, ``bare``, ``overhead``, ``bench_results``, ``bench_report``) and ``tcsched ramp``
(``ramp``). It talks to a server; it imports neither the build nor the scheduler (one declared exception:
``pipelines`` uses the build's config writers)."""
