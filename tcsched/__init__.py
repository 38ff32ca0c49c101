"""tcsched: dynamic TensorCore scheduling for lightweight vision models on NVIDIA Triton (import path ``tcsched``).

The folder ``tcsched/`` holds the command line (``tcsched.cli``, the top layer) and the shared modules that every
other part may use: the manifest contract, names, settings, image preprocessing, metrics, ONNX Runtime sessions,
atomic file writes, engine compatibility, the embedded tritonserver. The other parts are subpackages installed
from their own folders (``[tool.setuptools.package-dir]`` in pyproject.toml): ``tcsched.build_tools``
(build_tools/, the offline build), ``tcsched.client`` (client/, Triton clients and benchmarks) and
``tcsched.scheduler`` (backends/python_scheduler/, the online scheduler). Which may import which is the
import-linter contract in pyproject.toml.
"""

__version__ = "0.2.0"
