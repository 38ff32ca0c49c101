"""Model and tensor names of a tcsched repository, defined once (import path ``tcsched.names``).

The build writes them into every config.pbtxt (``tcsched.build_tools.repository``), the scheduler and the thin
Python-backend models read them, and the clients call them. ``ENSEMBLE`` is the default name of the served
classifier; a build may choose another one.
"""

from __future__ import annotations

ENSEMBLE = "classifier"  # ensemble: IMAGE -> preprocess -> scheduler -> LOGITS, VARIANT, DECISION
PREPROCESS = "preprocess"  # Python backend: encoded image bytes -> float32 [3, H, W]
SCHEDULER = "scheduler"  # Python backend: picks the variant(s) per request and row, calls them by BLS
LABELS_FILE = "labels.txt"  # one class name per line (Triton's classification extension)

IMAGE = "IMAGE"  # BYTES [1] per row: JPEG/PNG bytes (the ensemble's and preprocess' input)
PIXELS = "INPUT"  # FP32 [3, H, W] per row: preprocess' output, the scheduler's input
LOGITS = "LOGITS"  # FP32 [classes] per row
VARIANT = "VARIANT"  # BYTES [1] per row: the Triton model name that produced the row's logits
DECISION = "DECISION"  # BYTES [1] per row: JSON of the scheduler's decision for that row
