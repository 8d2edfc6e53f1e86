"""The UI, seen as a user sees it: `vaedist ui` over the tuned store, opened in headless Chromium.

Everything asserted here is read from the rendered page (DOM and layout), not from MLflow's REST API;
the MLflow client only supplies the ids to look for. Screenshots of each page go to test-artifacts/ui/,
taken also when an assertion fails. Needs the system Chromium (apt-get install chromium) and Playwright
(a dev extra); a missing one fails the test, it never skips.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from browser import chromium_page
from PIL import Image
from raycluster import free_port, session_processes, tail, terminate, wait_http

try:
    from playwright.sync_api import expect
except ImportError:  # chromium_page fails the test with how to install it
    expect = None

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "test-artifacts" / "ui"
TIMEOUT_S = 120  # per wait: the UI loads lazily and the machine may be busy with other tests
# The cells that sit on the same line as a label, right of it, with their horizontal centres: the
# cells (<th> or <td>) of the compare view's tables and the cells of its virtualized metrics grid alike.
_ROW_CELLS_JS = """(label) => {
  const r = label.getBoundingClientRect(), cy = (r.top + r.bottom) / 2, out = [];
  for (const c of document.querySelectorAll('td, th, .ReactVirtualized__Grid__innerScrollContainer > div')) {
    const b = c.getBoundingClientRect();
    if (b.width > 0 && b.left >= r.right - 1 && b.top <= cy && b.bottom >= cy)
      out.push([(b.left + b.right) / 2, c.innerText.trim()]);
  }
  return out;
}"""


@dataclass
class Store:
    experiment_id: str
    parent: mlflow.entities.Run
    finished: mlflow.entities.Run  # the child run of the trial that trained (and became champion)
    failed: mlflow.entities.Run  # the child run of the trial that crashed
    samples_path: str  # images/samples+step+...png of the finished trial
    samples_size: tuple[int, int]


@dataclass
class UI:
    base: str
    page: object  # playwright.sync_api.Page
    log: Path  # what `vaedist ui` printed


@pytest.fixture(scope="module")
def store(tuned_store, tmp_path_factory) -> Store:
    uri, result, _spec, _folder, _lines = tuned_store
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    exp = parent.info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    by_status = {c.info.status: c for c in children}
    assert sorted(by_status) == ["FAILED", "FINISHED"], (
        "the tuned store should hold one finished, one failed trial"
    )
    finished = by_status["FINISHED"]
    pngs = [a.path for a in client.list_artifacts(finished.info.run_id, "images")]
    samples = [p for p in pngs if Path(p).name.startswith("samples+") and p.endswith(".png")]
    assert len(samples) == 1, pngs
    local = client.download_artifacts(finished.info.run_id, samples[0], str(tmp_path_factory.mktemp("png")))
    with Image.open(local) as im:
        size = im.size
    return Store(exp, parent, finished, by_status["FAILED"], samples[0], size)


@pytest.fixture(scope="module")
def ui(tuned_store, tmp_path_factory):
    """`python -m vaedist ui` on a free port (its own session, all of it stopped after), and a browser page."""
    uri = tuned_store[0]
    root = tmp_path_factory.mktemp("ui")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = root / "vaedist-ui.log"
    SHOTS.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "vaedist", "ui", "--port", str(port), "--backend-store-uri", uri]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True
        )
    try:
        try:
            wait_http(f"{base}/health", 4 * TIMEOUT_S, proc=proc)  # four uvicorn workers start on 2 CPUs
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"vaedist ui did not come up: {exc}\n{tail(log)}", pytrace=False)
        assert f"MLflow UI for {uri} at {base}" in log.read_text()  # our wrapper ran it
        with chromium_page(root / "chromium-profile", timeout_s=TIMEOUT_S) as page:
            expect.set_options(timeout=TIMEOUT_S * 1000)
            yield UI(base, page, log)
    finally:
        left = terminate(session_processes({proc.pid}))
        with contextlib.suppress(OSError):
            (SHOTS / "vaedist-ui.log").write_bytes(log.read_bytes())
        assert not left, f"processes of vaedist ui still running: {sorted(left)}"


def _shot(page, name: str) -> None:
    with contextlib.suppress(Exception):  # a screenshot must not hide the assertion that failed
        page.screenshot(path=str(SHOTS / f"{name}.png"))


def _close_assistant(page) -> None:
    """MLflow 3.17 opens its chat side panel on every page: closed, it leaves room for what we look at."""
    close = page.locator('button[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.is_visible():
        close.click()


def _row(page, run: mlflow.entities.Run):
    # AG Grid draws each row once per column block (pinned, centre): the first is the one with the name.
    return page.locator(f'[role=row][row-id="{run.info.run_id}"]')


def test_experiment_page_nests_the_trials_under_the_tune_run(ui, store):
    page = ui.page
    page.goto(f"{ui.base}/#/experiments/{store.experiment_id}/runs")
    try:
        parent = _row(page, store.parent).first
        expect(parent).to_be_visible()
        expect(parent).to_contain_text(store.parent.info.run_name)
        _close_assistant(page)
        # Collapsed at first: the trials are not rows of their own beside the parent, they are under it.
        for child in (store.finished, store.failed):
            expect(_row(page, child)).to_have_count(0)
        toggle = parent.locator("button[data-component-id*=runnamecellrenderer]")
        expect(toggle).to_have_count(1)
        toggle.click()
        for child in (store.finished, store.failed):
            expect(_row(page, child).first).to_be_visible()
            expect(_row(page, child).first).to_contain_text(child.info.run_name)
            expect(_row(page, child).locator("button[data-component-id*=runnamecellrenderer]")).to_have_count(
                0
            )
        # Right below the parent, and indented: the name links of the trials start further right.
        index = {
            run.info.run_id: int(_row(page, run).first.get_attribute("row-index"))
            for run in (store.parent, store.finished, store.failed)
        }
        p = index[store.parent.info.run_id]
        assert sorted(index.values()) == [p, p + 1, p + 2], index

        def name_x(run):
            return _row(page, run).first.locator(f'a[href$="/runs/{run.info.run_id}"]').bounding_box()["x"]

        assert name_x(store.finished) > name_x(store.parent) + 10
        assert name_x(store.failed) > name_x(store.parent) + 10
        # The trial that won is the registered model's source: its row links vaedist-mnist.
        expect(_row(page, store.finished).filter(has_text="vaedist-mnist")).to_have_count(1)
        expect(_row(page, store.failed).filter(has_text="vaedist-mnist")).to_have_count(0)
    finally:
        _shot(page, "1-experiment-runs")


def _cells_by_run(page, label, columns: dict[float, str]) -> dict[str, str]:
    """{run id: text} of the cells on label's line, each given to the run whose column it sits under."""
    cells = label.evaluate(_ROW_CELLS_JS)
    return {columns[min(columns, key=lambda x: abs(x - cx))]: text for cx, text in cells}


def test_compare_view_shows_params_and_metrics_of_both_trials(ui, store):
    page = ui.page
    runs = [store.finished.info.run_id, store.failed.info.run_id]
    compact = {"separators": (",", ":")}
    page.goto(
        f"{ui.base}/#/compare-runs?runs={json.dumps(runs, **compact)}"
        f"&experiments={json.dumps([store.experiment_id], **compact)}"
    )
    try:
        expect(page.get_by_text("Comparing 2 Runs from 1 Experiment")).to_be_visible()
        run_id_label = page.locator("th:text-is('Run ID:')")
        depth_label = page.locator("th:text-is('model.depth')")
        elbo_label = page.locator("a:text-is('val_neg_elbo')")
        for label in (run_id_label, depth_label, elbo_label):
            expect(label).to_be_visible()
        _close_assistant(page)
        page.set_viewport_size({"width": 1600, "height": 2400})  # the whole page in one screenshot
        expect(elbo_label).to_be_visible()
        # The parallel-coordinates plot (drawn last, lazily) has an axis for the searched param.
        expect(page.locator("svg text.axis-title").filter(has_text="model.depth")).to_be_visible()

        columns = {cx: text for cx, text in run_id_label.evaluate(_ROW_CELLS_JS)}
        assert sorted(columns.values()) == sorted(runs), columns
        names = _cells_by_run(page, page.locator("th:text-is('Run Name:')"), columns)
        assert names == {r.info.run_id: r.info.run_name for r in (store.finished, store.failed)}

        depth = _cells_by_run(page, depth_label, columns)
        assert depth == {r.info.run_id: r.data.params["model.depth"] for r in (store.finished, store.failed)}
        assert depth[store.finished.info.run_id] != depth[store.failed.info.run_id]

        elbo = _cells_by_run(page, elbo_label, columns)
        assert set(elbo) == set(runs), elbo
        shown = float(elbo[store.finished.info.run_id])
        assert shown == pytest.approx(store.finished.data.metrics["val_neg_elbo"], rel=1e-3)
        # The crashed trial logged no ELBO: the UI must show none, not a number taken from elsewhere.
        text = elbo[store.failed.info.run_id]
        assert text in ("", "-", "NaN") or not math.isfinite(float(text)), text
    finally:
        _shot(page, "2-compare-runs")
        page.set_viewport_size({"width": 1600, "height": 1100})


def test_run_artifacts_show_the_sample_grid(ui, store):
    page = ui.page
    page.goto(f"{ui.base}/#/experiments/{store.experiment_id}/runs/{store.finished.info.run_id}/artifacts")
    try:
        expect(page.get_by_text(store.finished.info.run_name).first).to_be_visible()
        folder = page.locator('[data-testid="artifact-tree-node"][artifact-name="images"]')
        expect(folder).to_be_visible()
        _close_assistant(page)
        folder.click()
        name = Path(store.samples_path).name
        node = page.locator(f'[data-testid="artifact-tree-node"][artifact-name="{name}"]')
        expect(node).to_be_visible()
        # The other pictures of the run are listed beside it.
        for key in ("reconstructions", "latent_scatter"):
            expect(
                page.locator(f'[data-testid="artifact-tree-node"][artifact-name^="{key}+"]').first
            ).to_be_visible()
        node.click()
        img = page.locator(f'img[alt="{store.samples_path}"]')
        expect(img).to_be_visible()
        page.wait_for_function("(img) => img.complete && img.naturalWidth > 0", arg=img.element_handle())
        natural = img.evaluate("(img) => [img.naturalWidth, img.naturalHeight]")
        assert tuple(natural) == store.samples_size  # the logged PNG itself, decoded by the browser
        box = img.bounding_box()
        assert box["width"] > 100 and box["height"] > 100, box  # and drawn at a size one can see
        # Clicking the long file name scrolled the tree sideways: back to the start for the screenshot.
        node.evaluate("(n) => { for (let e = n; e; e = e.parentElement) e.scrollLeft = 0; }")
    finally:
        _shot(page, "3-run-artifacts-samples")


def test_experiment_opens_on_its_runs_and_a_trial_shows_its_dataset(ui, store):
    """Through the link `vaedist ui` prints, the experiment opens as model training (its runs), not on
    MLflow's GenAI overview ("Traces 0"); the Dataset column shows what each trial trained on."""
    page = ui.page
    printed = (Path(ui.log).read_text().split(" at ", 1)[1]).split()[0]  # the link a person clicks
    assert printed.startswith(ui.base) and "workflowType=machine_learning" in printed
    page.goto(printed)
    try:
        page.locator(f'a[href*="experiments/{store.experiment_id}"]').first.click()  # from the list, as a person
        parent = _row(page, store.parent).first
        expect(parent).to_be_visible()  # the runs table, straight away
        _close_assistant(page)
        expect(page.get_by_text("No data available")).to_have_count(0)
        if _row(page, store.finished).count() == 0:  # the UI remembers an expanded parent across pages
            parent.locator("button[data-component-id*=runnamecellrenderer]").click()
        trial = _row(page, store.finished)
        expect(trial.filter(has_text="mnist-train")).to_have_count(1)
        expect(_row(page, store.parent).filter(has_text="mnist-train")).to_have_count(0)  # a search trains nothing
    finally:
        _shot(page, "4-experiment-opens-on-runs-with-datasets")
