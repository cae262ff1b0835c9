import os
import tempfile

# Hypothesis writes files (patches with failing examples) only into its storage directory: keep that out of the
# repository (before hypothesis is imported).
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "moe_lab_hypothesis"))

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per xdist worker (and per notebook kernel, which inherits the environment): with one worker per
    # core, more threads only oversubscribe the CPU, and small OpenMP matmuls then slow down by 10x or more.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from moe_lab import seed_everything

# Property-based tests (tests/test_properties_*.py): the same examples on every run (derandomize, no example
# database written into the repository), a modest number of them, and no per-example deadline, which a loaded
# 2-core CI machine would miss at random. HYPOTHESIS_PROFILE=thorough searches harder (locally, not in CI).
settings.register_profile("ci", derandomize=True, database=None, max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow], print_blob=True)
settings.register_profile("thorough", parent=settings.get_profile("ci"), derandomize=False, max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    seed_everything(0)


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
