"""perf_analyzer (from the ``tritonclient[all]==2.51.0`` wheel) as a library (import path
``tcsched.client.perf_analyzer``): locate and run it, feed it real inputs, parse what it writes.

Results come from files, never from perf_analyzer's stdout: the CSV latency report and the streamed profile
export (:mod:`.parsers`), and Triton's statistics API read before and after a run (:mod:`.stats`).

Modules: :mod:`.binary` (the binary and its environment), :mod:`.inputs` (``--input-data`` files),
:mod:`.parsers` (CSV report, profile export), :mod:`.stats` (statistics API), :mod:`.command`
(:class:`LoadSpec` and the command line), :mod:`.runner` (one measured level: :func:`run_load` /
:func:`run_perf_analyzer`). The names below are the public API; import them from this package.
"""

from tcsched.client.perf_analyzer.binary import (
    PerfAnalyzerError,
    cuda_runtime_lib_dir,
    find_perf_analyzer,
    perf_analyzer_env,
    perf_analyzer_version,
)
from tcsched.client.perf_analyzer.command import (
    LoadSpec,
    build_command,
    perf_analyzer_command,
    run_command,
    warm_up,
)
from tcsched.client.perf_analyzer.inputs import write_bytes_input_data, write_tensor_input_data
from tcsched.client.perf_analyzer.parsers import (
    STABILITY_WINDOWS,
    CsvRow,
    LoadMode,
    ProfileExperiment,
    RequestRecord,
    ServerBreakdown,
    composing_csvs,
    parse_perf_csv,
    parse_profile_export,
    within_budget_share,
)
from tcsched.client.perf_analyzer.runner import UNSTABLE_MARKER, PerfPoint, run_load, run_perf_analyzer
from tcsched.client.perf_analyzer.stats import (
    ModelStats,
    Protocol,
    StatsDelta,
    server_statistics,
    statistics_delta,
    variant_usage_delta,
)

__all__ = [
    "STABILITY_WINDOWS",
    "UNSTABLE_MARKER",
    "CsvRow",
    "LoadMode",
    "LoadSpec",
    "ModelStats",
    "PerfAnalyzerError",
    "PerfPoint",
    "ProfileExperiment",
    "Protocol",
    "RequestRecord",
    "ServerBreakdown",
    "StatsDelta",
    "build_command",
    "composing_csvs",
    "cuda_runtime_lib_dir",
    "find_perf_analyzer",
    "parse_perf_csv",
    "parse_profile_export",
    "perf_analyzer_command",
    "perf_analyzer_env",
    "perf_analyzer_version",
    "run_command",
    "run_load",
    "run_perf_analyzer",
    "server_statistics",
    "statistics_delta",
    "variant_usage_delta",
    "warm_up",
    "within_budget_share",
    "write_bytes_input_data",
    "write_tensor_input_data",
]
