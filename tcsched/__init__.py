"""tcsched: dynamic TensorCore scheduling for lightweight vision models on NVIDIA Triton."""

__version__ = "0.1.0"
