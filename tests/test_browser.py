"""The lecture and exercise notebooks in a real browser: JupyterLab in headless Chromium (Debian's ``chromium``),
driven by Playwright for Python with the system executable (no browser download; the network may be closed).

Every exercise notebook opens as a student meets it: unmodified once its kernel is up (JupyterLab writes the running
kernel's ``language_info`` over the stored one and marks the notebook modified if they differ, which is why the
course tool stores the solution's); one runs top to bottom with every check reporting TODO and no error output.

For every lecture notebook with a widget: the stored notebook opens without being marked modified and shows each
widget's static first render; after "run all" every widget renders live (no "Loading widget", no "Error
displaying widget", no error output) and moving one control per dashboard changes its figure. Then, with JupyterLab's "Save Widget State
Automatically" on, a run, save and reopen of the welcome notebook shows its dashboard from the saved state. Skipped with the reason when
Playwright or Chromium is missing.

The "run all" is the suite's one execution of these notebooks: it is checked as nbval checks a notebook (no cell
raises, every ``# NBVAL_CHECK_OUTPUT`` cell reproduces its stored output; :func:`tests.notebook_code.run_problems`),
and ``tests/conftest.py`` leaves them out of nbval whenever this test runs them. Each notebook is a class of its own,
so that ``pytest-xdist --dist loadscope`` spreads the notebooks over the workers.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from .notebook_code import ROOT, WIDGET_VIEW, run_problems, widget_notebooks

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install "
                                                             "playwright; the browser is Debian's chromium)")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)", allow_module_level=True)

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
TEST_SETTINGS = {  # JupyterLab's defaults, but quiet, offline, and every cell kept in the page
    "@jupyterlab/apputils-extension:notification": {"checkForUpdates": False, "fetchNews": "false"},
    "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none"},
}
RUN_TIMEOUT_S = 240  # "run all" of the slowest notebook, with room for a busy 2-core machine
UI_TIMEOUT_MS = 60_000
NOTEBOOKS = [path.name for path in widget_notebooks()]
EXERCISES = sorted(p.name for p in (ROOT / "exercises").glob("[0-9][0-9]_*.ipynb"))
pytestmark = pytest.mark.slow


def _server_url(runtime: Path, pid: int) -> str | None:
    """The URL the server with ``pid`` wrote to its runtime file once it listens (its port is its own choice)."""
    info = runtime / f"jpserver-{pid}.json"
    try:
        return json.loads(info.read_text())["url"].rstrip("/")
    except (OSError, ValueError, KeyError):
        return None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on localhost with a token, serving a temporary copy of notebooks/. The server picks its own
    free port (a port chosen here could be taken by another test's kernel before the server binds it)."""
    tmp = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", tmp / "notebooks")
    shutil.copytree(ROOT / "exercises", tmp / "notebooks" / "exercises")
    (tmp / "app_settings").mkdir()
    (tmp / "app_settings" / "overrides.json").write_text(json.dumps(TEST_SETTINGS))
    token, runtime = uuid.uuid4().hex, tmp / "runtime"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "JUPYTER_CONFIG_DIR": str(tmp / "config"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp / "user_settings"), "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "workspaces"),
           "JUPYTER_RUNTIME_DIR": str(runtime)}
    log = open(tmp / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={random.randint(20000, 60000)}", "--ServerApp.port_retries=200",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={tmp / 'notebooks'}",
         f"--LabApp.app_settings_dir={tmp / 'app_settings'}", "--LabApp.expose_app_in_browser=True",
         "--LabApp.news_url=None"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            base = _server_url(runtime, server.pid)
            try:
                if base:
                    urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                    break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"jupyter lab did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"base": base, "token": token, "root": tmp / "notebooks"}
    finally:
        _stop(server)
        log.close()


def _stop(server: subprocess.Popen) -> None:
    """Stop the server's whole process group (its kernels too); nothing to do where it has already exited."""
    for sig, wait in ((15, 20), (9, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def browser(lab, tmp_path_factory):
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True, args=FLAGS,
            viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(UI_TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


# --- page helpers ---------------------------------------------------------------------------------------------
NOTEBOOK_JS = "jupyterapp.shell.currentWidget"
KERNEL_IDLE_JS = f"""() => {{
    const w = window.jupyterapp && {NOTEBOOK_JS};
    const kernel = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
    return !!(w && w.content && w.context.isReady && kernel && kernel.status === 'idle');
}}"""
ALL_RUN_JS = f"""() => {{
    const w = {NOTEBOOK_JS};
    const code = w.content.widgets.filter(c => c.model.type === 'code');
    const failed = code.some(c => c.model.outputs.toJSON().some(o => o.output_type === 'error'));
    return w.sessionContext.session.kernel.status === 'idle'
        && (failed || code.every(c => /^\\[\\d+\\]/.test(c.promptNode.textContent.trim())));
}}"""


def _api(lab, method: str, path: str, body: dict | None = None):
    request = urllib.request.Request(f"{lab['base']}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"token {lab['token']}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return json.loads(body) if body else None


def _shutdown_kernels(lab) -> None:
    for session in _api(lab, "GET", "/api/sessions"):
        _api(lab, "DELETE", f"/api/sessions/{session['id']}")
    for kernel in _api(lab, "GET", "/api/kernels"):
        _api(lab, "DELETE", f"/api/kernels/{kernel['id']}")


def _open(page, lab, name: str) -> None:
    """Open ``name`` alone (``reset``: a fresh workspace, not the tabs an earlier page left open)."""
    page.goto(f"{lab['base']}/lab/tree/{name}?reset&token={lab['token']}")
    page.wait_for_function(KERNEL_IDLE_JS, timeout=UI_TIMEOUT_MS * 2)
    page.wait_for_function(f"() => {NOTEBOOK_JS}.context.path.endsWith({json.dumps(name)})")


def _model_differences(page, lab, name: str) -> str:
    """What JupyterLab's model of ``name`` holds that the file does not (metadata and cells)."""
    model = json.loads(page.evaluate(f"() => JSON.stringify({NOTEBOOK_JS}.context.model.toJSON())"))
    stored = json.loads((lab["root"] / name).read_text())
    diffs = [f"metadata[{key!r}]" for key in set(model["metadata"]) | set(stored["metadata"])
             if model["metadata"].get(key) != stored["metadata"].get(key)]
    if len(model["cells"]) != len(stored["cells"]):
        diffs.append(f"{len(model['cells'])} cells vs {len(stored['cells'])}")
    for i, (a, b) in enumerate(zip(model["cells"], stored["cells"])):
        for key in ("source", "outputs", "execution_count"):
            x, y = a.get(key), b.get(key)
            if key == "source":
                x, y = ("".join(v) if isinstance(v, list) else v for v in (x, y))
            if x != y:
                diffs.append(f"cell {i} {key}")
    return ", ".join(diffs) or "no difference in content (a transient change)"


def _open_and_run_all(page, lab, name: str) -> None:
    """Open ``name``, run every cell, wait until all have run (or one failed), check the run as nbval would and
    that every widget rendered."""
    _open(page, lab, name)
    page.evaluate("async () => { await jupyterapp.commands.execute('notebook:run-all-cells'); }")
    page.wait_for_timeout(500)
    page.wait_for_function(ALL_RUN_JS, timeout=RUN_TIMEOUT_S * 1000, polling=500)
    ran = json.loads(page.evaluate(f"() => JSON.stringify({NOTEBOOK_JS}.context.model.toJSON())"))["cells"]
    problems = run_problems(ran, json.loads((ROOT / "notebooks" / name).read_text())["cells"])
    assert not problems, f"{name}: " + "\n".join(problems)[:5000]
    _assert_widgets_render(page, name)


def _texts(page) -> list[str]:
    return page.locator(".jp-OutputArea-output").all_inner_texts()


def _assert_widgets_render(page, name: str) -> None:
    outputs = page.locator(".jp-OutputArea-output")
    page.wait_for_function("() => ![...document.querySelectorAll('.jp-OutputArea-output')]"
                           ".some(o => o.textContent.includes('Loading widget'))", timeout=UI_TIMEOUT_MS)
    texts = _texts(page)
    assert not any("Error displaying widget" in t for t in texts), f"{name}: a widget failed to display"
    errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
    assert errors.count() == 0, f"{name}: error or warning output:\n" + "\n".join(errors.all_inner_texts())[:3000]
    assert outputs.count() > 0


def _dashboards(page):
    """Live dashboards: widget boxes whose Output child shows a figure (outer boxes only)."""
    boxes = page.locator(".jp-OutputArea-output > .jupyter-widgets.widget-vbox")
    return [boxes.nth(i) for i in range(boxes.count()) if boxes.nth(i).locator(".widget-output img").count()]


def _move_one_control(page, dashboard) -> str:
    """Change one control of ``dashboard`` like a user would; return what was moved."""
    select = dashboard.locator("select")
    if select.count():
        options = select.first.locator("option").all_inner_texts()
        current = select.first.input_value()
        value = next(o for o in options if o != current)
        select.first.select_option(label=value)
        return f"dropdown -> {value}"
    button = dashboard.locator("button.jupyter-button", has_text="reset")
    if button.count():
        button.first.click()
        return "reset button"
    handle = dashboard.locator(".noUi-handle").first
    handle.focus()
    page.keyboard.press("ArrowRight")
    return "slider +1 step"


# --- tests ----------------------------------------------------------------------------------------------------
class _NotebookInBrowser:
    """The browser tests of one notebook, ``notebook`` (one subclass per notebook, made below)."""

    notebook: str

    def test_stored_notebook_opens_unmodified_with_static_widgets(self, browser, lab):
        name = self.notebook
        page = browser.new_page()
        try:
            _open(page, lab, name)
            page.wait_for_timeout(1000)  # let the kernel's info and the widget manager settle
            if page.evaluate(f"() => {NOTEBOOK_JS}.context.model.dirty"):
                pytest.fail(f"{name} is marked modified on open: {_model_differences(page, lab, name)}")
            _assert_widgets_render(page, name)
            texts = _texts(page)
            assert not any(t.strip().endswith("0%|          |") or " 0%|" in t for t in texts), \
                f"{name}: a stored progress bar shows 0%"
            nb = json.loads((lab["root"] / name).read_text())
            views = sum(WIDGET_VIEW in o.get("data", {}) for c in nb["cells"] if c["cell_type"] == "code"
                        for o in c["outputs"])
            images = page.locator(".jp-OutputArea-output img")
            assert images.count() >= views - sum("|" in t and "%" in t for t in texts), \
                f"{name}: a stored dashboard shows no figure"
        finally:
            page.close()
            _shutdown_kernels(lab)

    def test_run_all_renders_live_widgets_and_controls_redraw(self, browser, lab):
        name = self.notebook
        page = browser.new_page()
        try:
            _open_and_run_all(page, lab, name)
            for i, dashboard in enumerate(_dashboards(page)):
                image = dashboard.locator(".widget-output img").first
                before = image.get_attribute("src")
                moved = _move_one_control(page, dashboard)
                page.wait_for_function(
                    "([el, before]) => { const img = el.querySelector('.widget-output img');"
                    " return img && img.getAttribute('src') !== before; }",
                    arg=[dashboard.element_handle(), before], timeout=UI_TIMEOUT_MS)
                assert not any("Error displaying widget" in t for t in _texts(page)), f"{name} dashboard {i}: {moved}"
            bars = [t for t in _texts(page) if "it/s" in t]  # tqdm progress bars
            assert all("100%" in t for t in bars), f"{name}: progress bars did not finish: {bars}"
        finally:
            page.close()
            _shutdown_kernels(lab)


for _name in NOTEBOOKS:  # a class per notebook: xdist's loadscope schedules classes apart
    _class = "TestNotebook" + Path(_name).stem.title().replace("_", "")
    globals()[_class] = type(_class, (_NotebookInBrowser,), {"notebook": _name})


def test_saved_notebook_reopens_with_its_dashboard(browser, lab):
    """With *Settings -> Save Widget State Automatically* on (as the welcome notebook and README advise): run,
    save, shut down, reopen: the dashboard comes back from the saved widget state, not as an error."""
    name = "00_welcome.ipynb"
    plugin = "/lab/api/settings/@jupyter-widgets/jupyterlab-manager:plugin"
    _api(lab, "PUT", plugin, {"raw": json.dumps({"saveState": True})})
    page = browser.new_page()
    try:
        _open_and_run_all(page, lab, name)
        page.evaluate("async () => { await jupyterapp.commands.execute('docmanager:save'); }")
        page.wait_for_function(f"() => !{NOTEBOOK_JS}.context.model.dirty")
        page.close()
        _shutdown_kernels(lab)
        page = browser.new_page()
        saved = json.loads((lab["root"] / name).read_text())
        state = saved["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
        views = [o["data"][WIDGET_VIEW]["model_id"] for c in saved["cells"] if c["cell_type"] == "code"
                 for o in c["outputs"] if WIDGET_VIEW in o.get("data", {})]
        assert views and all(v in state for v in views), "the saved notebook lacks the state of its widgets"
        _open(page, lab, name)
        _assert_widgets_render(page, name)
        assert page.locator(".jp-OutputArea-output .widget-output img").count() >= len(views)
    finally:
        page.close()
        _shutdown_kernels(lab)
        _api(lab, "PUT", plugin, {"raw": "{}"})
        shutil.copy(ROOT / "notebooks" / name, lab["root"] / name)  # the stored notebook again, for other tests


@pytest.mark.parametrize("name", EXERCISES)
def test_exercise_notebook_opens_unmodified(browser, lab, name):
    page = browser.new_page()
    try:
        _open(page, lab, f"exercises/{name}")
        page.wait_for_timeout(1000)  # let the kernel's info settle
        if page.evaluate(f"() => {NOTEBOOK_JS}.context.model.dirty"):
            pytest.fail(f"{name} is marked modified on open: {_model_differences(page, lab, f'exercises/{name}')}")
    finally:
        page.close()
        _shutdown_kernels(lab)


def test_exercise_notebook_runs_as_a_student_meets_it(browser, lab):
    """Run all on an untouched exercise notebook: every check says TODO, nothing raises, the header's hint() works."""
    name = "exercises/" + EXERCISES[0]
    page = browser.new_page()
    try:
        _open(page, lab, name)
        page.evaluate("async () => { await jupyterapp.commands.execute('notebook:run-all-cells'); }")
        page.wait_for_timeout(500)
        page.wait_for_function(ALL_RUN_JS, timeout=RUN_TIMEOUT_S * 1000, polling=500)
        texts = _texts(page)
        errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
        assert errors.count() == 0, "\n".join(errors.all_inner_texts())[:3000]
        todo = [t for t in texts if t.startswith("[TODO]")]
        nb = json.loads((lab["root"] / name).read_text())
        assert len(todo) == len(nb["metadata"]["moe_lab"]["exercises"]), texts
    finally:
        page.close()
        _shutdown_kernels(lab)


def test_another_python_marks_an_exercise_notebook_modified_only_by_its_language_info(browser, lab):
    """What the stored metadata cannot do: on another Python version JupyterLab writes that version's
    ``language_info`` (and nothing else) and so marks the notebook modified once."""
    name = "exercises/" + EXERCISES[0]
    other = lab["root"] / "exercises" / "other_python.ipynb"
    nb = json.loads((lab["root"] / name).read_text())
    nb["metadata"]["language_info"]["version"] = "3.99.0"
    other.write_text(json.dumps(nb))
    page = browser.new_page()
    try:
        _open(page, lab, "exercises/other_python.ipynb")
        page.wait_for_timeout(1000)
        assert page.evaluate(f"() => {NOTEBOOK_JS}.context.model.dirty")
        assert _model_differences(page, lab, "exercises/other_python.ipynb") == "metadata['language_info']"
    finally:
        page.close()
        _shutdown_kernels(lab)
        other.unlink()
