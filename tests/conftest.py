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

try:  # nbval waits 5 s at most between a cell's output messages (not configurable); a loaded 2-core machine can
    # miss that after a long training cell, failing a correct notebook: wait up to a minute (a cell's own time limit
    # is still --nbval-cell-timeout).
    from nbval.plugin import IPyNbCell

    _nbval_cell_init = IPyNbCell.__init__

    def _patient_cell_init(self, *args, **kwargs):
        _nbval_cell_init(self, *args, **kwargs)
        self.output_timeout = 60

    IPyNbCell.__init__ = _patient_cell_init
except ImportError:  # nbval not installed: no notebook tests
    pass

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


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: only what will really run counts
def pytest_collection_modifyitems(config, items):
    """Run each notebook once: a lecture notebook whose "run all" the browser test will check (as nbval would,
    see ``tests/test_browser.py``) leaves nbval; without the browser test (no Chromium, or deselected) nbval runs
    it. Then the longest scopes first (the browser's notebooks, then every notebook under nbval), so that
    ``pytest-xdist --dist loadscope`` does not start a long one last."""
    in_browser = {getattr(item.cls, "notebook", None) for item in items
                  if item.nodeid.startswith("tests/test_browser.py::") and item.name.startswith("test_run_all")}
    dropped = [item for item in items if item.path.suffix == ".ipynb" and item.path.parent.name == "notebooks"
               and item.path.name in in_browser]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        kept = set(map(id, dropped))
        items[:] = [item for item in items if id(item) not in kept]

    def weight(item) -> int:
        return 0 if item.nodeid.startswith("tests/test_browser.py::") else 1 if item.path.suffix == ".ipynb" else 2

    items.sort(key=weight)  # stable: the order inside each group stays
