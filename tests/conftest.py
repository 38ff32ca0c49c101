from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample"


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """The 512 labeled ImageNet images beside the project (../shared); tests that need them skip without."""
    if not (SHARED / "labels.csv").is_file():
        pytest.skip(f"labeled sample not found at {SHARED}")
    return SHARED
