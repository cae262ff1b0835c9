import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per xdist worker (and per notebook kernel, which inherits the environment): with one worker per
    # core, more threads only oversubscribe the CPU, and small OpenMP matmuls then slow down by 10x or more.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from moe_lab import seed_everything

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    seed_everything(0)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
