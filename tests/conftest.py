import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))
# tests and the servers / trainings they start never reach the network
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
os.environ["HF_HUB_OFFLINE"] = "1"
# ITK sets the C locale when it is imported in the test process: children still write UTF-8 (progress bars)
os.environ["PYTHONIOENCODING"] = "utf-8"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_net():
    from bundle.networks import PromptableSAM

    torch.manual_seed(0)
    return PromptableSAM("tiny", image_size=64, lora_rank=4)


def needs_shared_data(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs the shared datasets at {path} (../shared/data beside the checkout)")
    return path
