"""The cost where users look, checked in a real browser (Debian's chromium driven by Playwright).

One short metered training run goes through the real stack (Prefect server, pools, `prefect deploy`, a
process worker); a real `mlflow server` serves the same tracking store. The tests then open the
pages a user opens, the Prefect flow-run page and the MLflow run page, and assert that the ledger's
settled cost is on them. Every page is kept as a screenshot under `$OPPEN_TEST_OUTPUT/screenshots/`
(default `test-output/screenshots/`); a failing page also leaves its HTML and text there.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from uuid import UUID

import pytest

from oppen.cost.money import to_usd
from oppen.tracking_keys import COST_TOTAL
from tests.browser import CHROMIUM, Browser
from tests.mlflow_server import MlflowServer

BROWSER_TIER = [
    pytest.mark.slow,
    pytest.mark.integration,
    # Checked at collection, so a machine without the browser does not start a stack for nothing.
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent: the browser tier needs Debian's "
                       "chromium (`apt-get install -y chromium`; .ci/run installs it)"),
]


def browser_tier(test):
    """The marks of a test that drives the browser (the module's one fast test, of the pattern, has none)."""
    for mark in BROWSER_TIER:
        test = mark(test)
    return test


# Short (60 steps, well under a minute of training) but a real, metered, settled run with a cap
# far above its cost, so it completes rather than stopping at the cap.
UI_RUN = {"epochs": 1, "batch_size": 128, "learning_rate": 5e-3, "max_steps": 60, "log_every_steps": 20}
UI_COST = {"team": "default", "max_cost_usd": 0.05}


# ---- What each page must show. Tighten these as the presentation improves. ------------------------------

def amount_pattern(micros: int, currency: str) -> re.Pattern:
    """The settled amount as a page may print it: `$0.000291`, or `$0.00029` for 290 micro-dollars.

    Oppen prints money with 6 places (`f"${x:.6f}"`) or through `format_usd` (trailing zeros dropped,
    thousands separated: `$1,250.00`), and MLflow prints a metric as JavaScript prints the float (`0.00029`,
    `1250`). All are the exact micro-dollar amount, so any may match; `$0.0002901`, `$0.000292` or
    `$10.00029` may not (no other digit may come before or after).
    """
    whole, fraction = f"{to_usd(micros):.6f}".split(".")
    fraction = fraction.rstrip("0")
    grouped = ",?".join(re.escape(whole[max(0, end - 3):end]) for end in range(len(whole), 0, -3)[::-1])
    decimals = rf"\.{fraction}0*" if fraction else r"(?:\.0+)?"
    return re.compile(rf"(?<![\d.,]){re.escape(currency)}{grouped}{decimals}(?!\.?\d)")


@pytest.mark.parametrize(("micros", "currency", "text", "matches"), [
    (291, "$", "$0.000291 of $0.050000 cap", True),
    (290, "$", "$0.000290 of $0.050000 cap", True),  # 6 places
    (290, "$", "$0.00029 of $0.05 cap (1.0%)", True),  # format_usd
    (290, "$", "$0.0002901", False),
    (290, "$", "$0.000291", False),
    (290, "$", "$10.00029", False),
    (291, "", "cost/total_usd | 0.000291 | mnist-cnn", True),  # an MLflow metric, no currency
    (291, "", "0.0002910000000001", False),  # float noise is another number
    (1_250_000_000, "$", "$1,250.00", True),
    (1_250_000_000, "$", "$1,250.01", False),
    (1_250_000_000, "", "1250", True),
    (12_413_000, "$", "$12.4130", True),
    (12_413_000, "$", "$12.41", False),
])
def test_amount_pattern_finds_exactly_the_settled_amount(micros, currency, text, matches):
    assert bool(amount_pattern(micros, currency).search(text)) is matches


def expected_on_pages(spent_micros: int) -> dict[str, re.Pattern]:
    """Where the ledger's settled cost must appear, one pattern per place a test looks.

    - "prefect_state_message": the Completed state's message (Details tab, "State Message"): at the last
      commit "$0.000291 of $0.050000 cap · test_accuracy 0.9915", in the working tree
      "$0.001175 of $0.05 cap (2.4%) · test accuracy 96.62%". To require that it leads with the cost, and
      the cap too, extend the pattern here, e.g. `re.compile(rf"^{dollars.pattern} of \\$0\\.05 cap")`.
    - "mlflow_overview": anywhere on the run's Overview tab: the metrics table's row (`cost/total_usd | 0.000291`,
      a plain number; `cost_usd` at the last commit) and, in the working tree, the run's description
      ("$0.000291 of $0.05 cap ..."). To require the description, match the description box with the
      dollar pattern instead (the box is the overview's element under the "Description" heading).
    """
    dollars = amount_pattern(spent_micros, "$")
    # (MLflow prints metrics as plain numbers: `0.000291`, no dollar sign.)
    return {
        # The run's header carries the settled cost as a tag (`cost:$0.000291`), in sight on every tab.
        "prefect_header": dollars,
        # The Completed state's message leads with the cost, then the cap (UI_COST's $0.05) and its share.
        "prefect_state_message": re.compile(rf"^{dollars.pattern} of \$0\.05 cap \("),
        # The MLflow run's description leads with the cost in dollars; the metrics table has it as a number.
        "mlflow_description": dollars,
        "mlflow_overview": amount_pattern(spent_micros, ""),
    }


# Whether the cost must be in sight on MLflow's overview without scrolling. The metrics box alone does not
# do it: the run logs ~50 metrics and the box shows about 14, in logging order (system metrics first), with
# the cost below them (at the last commit this had to be False). The run's description, near the top of
# the overview, leads with the cost in the working tree.
MLFLOW_COST_VISIBLE = True
# The run's cost as an MLflow metric, named where every writer and reader of MLflow keys takes it from.
COST_METRIC = COST_TOTAL


# ---- The run, the servers and the browser ----------------------------------------------------------------

@dataclass(frozen=True)
class FinishedRun:
    flow_run_id: str
    state_message: str
    spent_micros: int
    mlflow_run_id: str
    experiment_id: str
    summary_artifact_key: str  # the markdown artifact that links the MLflow run
    published_mlflow_url: str  # that link
    prefect_ui: str
    mlflow_ui: str

    @property
    def expected(self) -> dict[str, re.Pattern]:
        return expected_on_pages(self.spent_micros)

    def name(self, what: str) -> str:
        """A screenshot's name: which UI, which page, which run."""
        return f"{what}-{self.flow_run_id[:8]}"


@pytest.fixture(scope="module")
def mlflow_ui(stack):
    """`mlflow server` over the stack's own tracking store, where the flow's runs are written."""
    artifact_root = (stack.root / "oppen" / "mlartifacts").as_uri()  # where the stack's flows put artifacts
    with MlflowServer(stack.tracking_uri, artifact_root, stack.root / "mlflow-ui.log", env=stack.env) as server:
        yield server


@pytest.fixture(scope="module")
def finished_run(stack, mlflow_ui) -> FinishedRun:
    from mlflow import MlflowClient

    from oppen.cost.budgets import open_ledger

    # The worker's environment is shared with other modules; this run alone learns where the MLflow UI
    # is, through the pool's `env` job variable (which replaces the template's default, so that is kept).
    env = {"PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR": "reschedule", "OPPEN_MLFLOW_UI_URL": mlflow_ui.url}
    result = stack.prefect("deployment", "run", "train-mnist/local", "--watch", "--watch-timeout", "240",
                           "--param", f"run={json.dumps(UI_RUN)}", "--param", "min_test_accuracy=0.5",
                           "--param", f"cost={json.dumps(UI_COST)}", "--job-variable", f"env={json.dumps(env)}",
                           check=False, timeout=300)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", result.stdout)
    if result.returncode != 0 or not match or "Completed" not in result.stdout:
        pytest.fail(f"the UI run did not complete:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{stack.log('worker')}")
    flow_run_id = match.group(1)
    state = stack.read_flow_run(flow_run_id).state
    assert state.is_completed() and state.name == "Completed", state

    ledger = open_ledger(f"sqlite:///{stack.root / 'oppen' / 'ledger.db'}")
    try:
        [row] = [r for r in ledger.rows() if r["run_key"] == flow_run_id]
    finally:
        ledger.dispose()
    assert row["status"] == "settled" and row["spent_micros"] > 0, row

    client = MlflowClient(tracking_uri=stack.tracking_uri)
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    assert run.info.run_id == row["mlflow_run_id"]
    summary_key, link = _published_mlflow_link(stack, flow_run_id, run.info.run_id)
    return FinishedRun(flow_run_id=flow_run_id, state_message=state.message, spent_micros=row["spent_micros"],
                       mlflow_run_id=run.info.run_id, experiment_id=run.info.experiment_id,
                       summary_artifact_key=summary_key, published_mlflow_url=link,
                       prefect_ui=f"http://127.0.0.1:{stack.port}", mlflow_ui=mlflow_ui.url)


def _published_mlflow_link(stack, flow_run_id: str, mlflow_run_id: str) -> tuple[str, str]:
    """(artifact key, URL): the MLflow run link in the run's markdown summary, the link a user follows from Prefect.

    Found by what it points at, not by the artifact's key or the table's wording, which may change.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from tests.prefect_api import prefect_api

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)])))

    with prefect_api(stack.api_url):
        artifacts = asyncio.run(read())
    link = re.compile(rf"\]\((https?://[^)\s]*/#/experiments/\d+/runs/{mlflow_run_id}[^)\s]*)\)")
    for artifact in artifacts:
        if artifact.type == "markdown" and (match := link.search(str(artifact.data))):
            return artifact.key, match.group(1)
    pytest.fail(f"no markdown artifact of flow run {flow_run_id} links MLflow run {mlflow_run_id}: "
                f"{[(a.key, a.type) for a in artifacts]}")


@pytest.fixture(scope="module")
def browser():
    with Browser() as browser:
        yield browser


@pytest.fixture
def report(capsys):
    """Print past pytest's capture, so the screenshot paths are in the CI log of a passing run too."""
    def write(line: str) -> None:
        with capsys.disabled():
            print(f"\n[browser tier] {line}")

    return write


def _mlflow_run_page(run: FinishedRun) -> str:
    # `workflowType=machine_learning` switches MLflow 3.17's UI from its GenAI mode (its default for a fresh
    # browser) to the model-training view that training runs belong in.
    return (f"{run.mlflow_ui}/#/experiments/{run.experiment_id}/runs/{run.mlflow_run_id}"
            "?workflowType=machine_learning")


def _mlflow_view(page, experiment_id: str) -> str:
    """Which of MLflow's two views the page is in, told by its sidebar once the page has rendered.

    Not by the breadcrumb: in the GenAI view a run of an experiment that holds training runs is also
    under "Runs". The model-training sidebar's entry for the experiment's runs is a link that carries
    `workflowType=machine_learning`; the GenAI sidebar has "Evaluation runs" instead.
    """
    training = page.locator(f'a[href="#/experiments/{experiment_id}/runs?workflowType=machine_learning"]')
    genai = page.locator(f'a[href="#/experiments/{experiment_id}/evaluation-runs"]')
    training.or_(genai).first.wait_for()
    return "model training" if training.count() and not genai.count() else "GenAI"


def _in_viewport(locator) -> float:
    """How much of the element a user sees without scrolling (0 to 1), clipping by scrolled boxes included.

    IntersectionObserver is what Playwright's `to_be_in_viewport` uses; this returns the ratio instead of
    failing, so the test can report it.
    """
    return locator.evaluate("""element => new Promise(resolve => {
        const observer = new IntersectionObserver(([entry]) => { observer.disconnect(); resolve(entry.intersectionRatio); });
        observer.observe(element);
    })""")


# ---- Prefect ------------------------------------------------------------------------------------------

def _prefect_flow_run_page(page, tab: str | None = None):
    """Wait until the flow-run page shows the finished run (optionally on `tab`); its header's locator."""
    header = page.locator(".page-heading").first
    header.locator(".state-badge", has_text="Completed").wait_for()
    # The header's links (flow, deployment) arrive with later API calls; a picture without them misleads.
    header.locator('a[href^="/flows/flow/"]').wait_for()
    header.locator('a[href^="/deployments/deployment/"]').wait_for()
    if tab:
        # Clicked as a user does: `?tab=` in the URL is not honoured for every tab (Artifacts falls back to Logs).
        page.locator("li.p-tab", has_text=re.compile(rf"^{tab}$")).click()
    return header


@browser_tier
def test_prefect_flow_run_page_shows_the_settled_cost(finished_run, browser, report):
    run = finished_run
    expected = run.expected["prefect_state_message"]
    # The state's message as the API has it: if this fails, the UI checks below cannot pass either.
    assert expected.search(run.state_message), (expected.pattern, run.state_message)
    in_header = run.expected["prefect_header"]
    url = f"{run.prefect_ui}/runs/flow-run/{run.flow_run_id}"

    # What a user sees first: the run's header above the Logs tab.
    page = browser.open(url)
    with browser.evidence(page, run.name("prefect-flow-run-logs-tab"), report):
        header = _prefect_flow_run_page(page)
        page.locator(".log-row").first.wait_for()  # the logs have arrived too: the picture shows them
        header_text = header.inner_text()
        report(f"Prefect header: {' | '.join(header_text.splitlines())}")
        assert in_header.search(header_text), f"the settled cost {in_header.pattern} is not in the header {header_text!r}"

    # The state's message is not in the header: Prefect shows it on the Details tab, as "State Message".
    page = browser.open(url)
    with browser.evidence(page, run.name("prefect-flow-run-details-tab"), report):
        _prefect_flow_run_page(page, "Details")
        message = page.locator(".p-key-value", has=page.locator(".p-key-value__label", has_text="State Message"))
        shown = message.locator(".p-key-value__value").inner_text()
        report(f"Prefect state message: {shown}")
        assert expected.search(shown), f"the state message {shown!r} does not lead with the settled cost"
        assert shown.strip() == run.state_message.strip()  # the UI shows the state the API has, whole

    # Evidence for whoever improves the presentation: the artifacts (summary, cost report) as listed.
    page = browser.open(url)
    with browser.evidence(page, run.name("prefect-flow-run-artifacts-tab"), report):
        _prefect_flow_run_page(page, "Artifacts")
        page.get_by_text(run.summary_artifact_key, exact=True).first.wait_for()


# ---- MLflow -------------------------------------------------------------------------------------------

@browser_tier
def test_mlflow_run_overview_shows_the_settled_cost(finished_run, browser, report):
    run = finished_run
    expected = run.expected["mlflow_overview"]
    page = browser.open(_mlflow_run_page(run))
    with browser.evidence(page, run.name("mlflow-run-overview"), report):
        assert _mlflow_view(page, run.experiment_id) == "model training"
        overview = page.get_by_test_id("entity-overview-container")
        overview.get_by_text(run.mlflow_run_id, exact=True).wait_for()  # "Run ID" in "About this run"
        # The metrics table has rendered once its rows (each metric's name links to its chart) are there.
        overview.locator('[role=row] a[href*="/model-metrics"]').first.wait_for()
        text = overview.inner_text()
        assert expected.search(text), f"the settled cost {expected.pattern} is not on the run's overview:\n{text}"
        described = run.expected["mlflow_description"]
        assert described.search(text), f"the run's description does not give the cost in dollars:\n{text}"
        # Where a user finds it, and whether without scrolling (the metrics box scrolls on its own).
        first = overview.get_by_text(expected).first
        metric_row = overview.locator("[role=row]", has=page.get_by_role("link", name=COST_METRIC, exact=True)).first
        first_seen = _in_viewport(first)
        if metric_row.count():
            cells = " | ".join(cell for cell in re.split(r"\s*\n\s*|\t", metric_row.inner_text()) if cell.strip())
            sight = "in sight" if _in_viewport(metric_row) else "out of sight until the metrics box is scrolled"
            row = f"{cells} ({sight})"
        else:
            row = "absent"
        report(f"MLflow overview: the cost first shows in {first.inner_text().splitlines()[0][:100]!r} "
               f"({'in sight' if first_seen else 'out of sight without scrolling'}); the {COST_METRIC} row: {row}")
        if MLFLOW_COST_VISIBLE:
            assert first_seen > 0, "the cost is on the run's overview, but nowhere a user sees it without scrolling"

    # Evidence for whoever improves the presentation: the run's charts, where the cost is one chart of many.
    page = browser.open(_mlflow_run_page(run).replace("?", "/model-metrics?"))
    with browser.evidence(page, run.name("mlflow-run-model-metrics-tab"), report):
        assert _mlflow_view(page, run.experiment_id) == "model training"
        # Charts are titled by the key after its section's prefix ("total_usd" in section "cost"); their legends
        # name the whole key, e.g. "<run name> (cost/accrued_usd)": one there means the section has drawn.
        section = COST_METRIC.split("/")[0]
        page.get_by_text(re.compile(rf"\({re.escape(section)}/")).first.wait_for()


@browser_tier
def test_the_mlflow_link_oppen_publishes_opens_the_run_in_the_model_training_view(finished_run, browser, report):
    """The link in the run's summary is real: it opens this run, on the MLflow UI's server, in the training view."""
    run = finished_run
    assert run.published_mlflow_url.startswith(f"{run.mlflow_ui}/#/experiments/{run.experiment_id}/runs/"
                                               f"{run.mlflow_run_id}"), run.published_mlflow_url
    page = browser.open(run.published_mlflow_url)
    with browser.evidence(page, run.name("mlflow-run-overview-from-oppens-link"), report):
        overview = page.get_by_test_id("entity-overview-container")
        overview.get_by_text(run.mlflow_run_id, exact=True).wait_for()
        assert run.expected["mlflow_overview"].search(overview.inner_text())
        view = _mlflow_view(page, run.experiment_id)
        report(f"MLflow view opened by Oppen's link {run.published_mlflow_url}: {view}")
        assert view == "model training", f"{run.published_mlflow_url} opens MLflow's {view} view"
