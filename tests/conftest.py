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


def pytest_configure(config):
    """pytest-xdist's ``--dist loadscope`` reorders the scopes by their number of tests unless told not to: keep the
    order of :func:`pytest_collection_modifyitems` (longest scopes first; a browser notebook is 2 tests but minutes)."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


@pytest.hookimpl(hookwrapper=True)
def pytest_collection_modifyitems(config, items):
    """Around the other plugins' changes (``-k`` / ``-m`` deselection): first every nbval notebook cell is marked
    ``slow`` (``-m "not slow"`` leaves the notebooks out). Then, among what will really run, each notebook runs once:
    a lecture notebook whose "run all" the browser test will check (as nbval would, see ``tests/test_browser.py``)
    leaves nbval; without the browser test (no Chromium, or deselected) nbval runs it. Last, the longest scopes
    first (the browser's notebooks, the modules with a slow test, the notebooks under nbval), so that
    ``pytest-xdist --dist loadscope`` (which hands out scopes in the order they first appear) starts no long one
    last."""
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.slow)
    yield
    in_browser = {getattr(item.cls, "notebook", None) for item in items
                  if item.nodeid.startswith("tests/test_browser.py::") and item.name.startswith("test_run_all")}
    dropped = [item for item in items if item.path.suffix == ".ipynb" and item.path.parent.name == "notebooks"
               and item.path.name in in_browser]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        kept = set(map(id, dropped))
        items[:] = [item for item in items if id(item) not in kept]

    def weight(item) -> tuple:
        browser = item.nodeid.startswith("tests/test_browser.py::")
        notebook = (getattr(item.cls, "notebook", None) or "") if browser else item.path.name
        if not browser and item.path.suffix != ".ipynb":  # a module with a slow test is a long scope too
            return (1 if item.get_closest_marker("slow") else 3,)
        # later notebooks train more models: a rough "longest first" (the cells of a notebook stay together)
        return (0 if browser else 2, -int(notebook[:2]) if notebook[:2].isdigit() else 0, str(item.path.parent))

    items.sort(key=weight)  # stable: the order inside each group stays
