import pytest
import torch

from moe_lab import seed_everything

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    seed_everything(0)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
