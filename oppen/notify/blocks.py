"""Slack Block Kit messages for runs, cost reports and Oppen's events: pure data, no I/O.

Slack refuses a whole message when one block breaks a limit (`invalid_blocks`), and a run's message
must not be lost to a long run name, so every text is clipped to its limit here, and `SlackMessage`
checks the limits again whoever built it. Text from users (run names, headlines, payload strings)
is escaped: a run named `<!channel>` must not ping a channel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from oppen.display import metric_text, percent, usd  # noqa: F401 (re-exported: the Slack blocks' formats)
from oppen.events import (
    BUDGET_REFUSED,
    BUDGET_STOPPED,
    BUDGET_WARNING,
    CATALOG,
    COST_SETTLED,
    COST_THRESHOLD,
    GPU_UNDERUTILIZED,
    MODEL_PROMOTED,
    MODEL_REGISTERED,
    NOTIFICATION_FAILED,
    TRAINING_SLOW,
)

# Slack's limits (api.slack.com/reference/block-kit): a message, a block kind, a text object.
MAX_BLOCKS = 50
MAX_TEXT = 3000  # a section's text, the message's fallback text (Slack truncates beyond 4000)
MAX_FIELD_TEXT = 2000
MAX_FIELDS = 10  # per section
MAX_HEADER_TEXT = 150
MAX_CONTEXT_ELEMENTS = 10
MAX_BUTTON_TEXT = 75
MAX_URL = 3000  # a longer link is dropped: a clipped URL is a broken link
MAX_BUTTONS = 25
MAX_REPORT_ROWS = 10  # a weekly report is read at a glance; the rest is counted
MAX_EVENT_FIELDS = 30  # three sections: a payload is a handful of figures, anything beyond is noise

RunStatus = Literal["completed", "stopped", "refused", "invalid", "failed", "deferred"]

_STATUS = {  # emoji, words after the run's name
    "completed": (":white_check_mark:", "completed"),
    "stopped": (":octagonal_sign:", "stopped at its cap"),
    "refused": (":no_entry:", "refused: over budget"),
    "invalid": (":warning:", "refused: invalid request"),
    "failed": (":x:", "failed"),
    "deferred": (":hourglass_flowing_sand:", "deferred to off-peak"),
}

_EVENT_EMOJI = {
    BUDGET_WARNING: ":warning:",
    BUDGET_REFUSED: ":no_entry:",
    BUDGET_STOPPED: ":octagonal_sign:",
    COST_THRESHOLD: ":chart_with_upwards_trend:",
    COST_SETTLED: ":receipt:",
    MODEL_REGISTERED: ":package:",
    MODEL_PROMOTED: ":rocket:",
    TRAINING_SLOW: ":snail:",
    GPU_UNDERUTILIZED: ":zzz:",
    NOTIFICATION_FAILED: ":mailbox_with_no_mail:",
}

# Link labels as events and flows key them (RunEventContext.links), as a reader expects them on a button.
_LINK_LABELS = {"prefect": "Prefect", "mlflow": "MLflow"}

# Payload keys that hold a fraction 0-1 (shown as a percentage); dollars end in _usd, durations in _seconds.
_FRACTION_KEYS = frozenset({"fraction", "budget_fraction", "gpu_utilization", "threshold"})


class SlackMessage(BaseModel):
    """What is posted: the notification/fallback text and the Block Kit blocks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    text: str = Field(min_length=1, max_length=MAX_TEXT)
    blocks: list[dict[str, Any]] = Field(default_factory=list, max_length=MAX_BLOCKS)

    @model_validator(mode="after")
    def _texts_within_limits(self) -> SlackMessage:
        for text in _texts(self.blocks):
            if len(text) > MAX_TEXT:
                raise ValueError(f"a block text has {len(text)} characters; Slack allows {MAX_TEXT}")
        return self


class MetricValue(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    value: float


class RegisteredModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    version: int | str
    alias: str | None = None


class RunFacts(BaseModel):
    """What a run's message says; every figure optional, since a refused run has no cost and a failed one no metric."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    workload: str = Field(min_length=1, description="train-mnist, train-lm, ...")
    run_name: str = Field(min_length=1)
    flow_run_id: str | None = None
    status: RunStatus
    headline: str = Field(description="One sentence: what happened (the final state's message).")
    team: str
    experiment: str
    cost_usd: float | None = Field(None, ge=0)
    cap_usd: float | None = Field(None, ge=0)
    quote_usd: float | None = Field(None, ge=0)
    # Not capped at 1: an overspent budget (a price change, a manual booking) is shown as it is.
    budget_fraction: float | None = Field(None, ge=0, description="The budget used after this run, 0-1.")
    metric: MetricValue | None = None
    registered: RegisteredModel | None = None
    prefect_url: str | None = None
    mlflow_url: str | None = None


class CostRow(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    team: str
    experiment: str
    runs: int = Field(ge=0)
    cost_usd: float = Field(ge=0)


# --- formatting -------------------------------------------------------------------------------


def escape(text: str) -> str:
    """Slack's three control characters: without this, `<!channel>` in a run name pings everyone."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def clip(text: str, limit: int) -> str:
    """At most `limit` characters, ending in an ellipsis when cut, never in half an escaped entity."""
    if len(text) <= limit:
        return text
    cut = re.sub(r"&[a-z]*$", "", text[: limit - 1])
    return cut + "…"


# --- blocks -----------------------------------------------------------------------------------


def header(text: str) -> dict[str, Any]:
    return {"type": "header", "text": {"type": "plain_text", "text": clip(text, MAX_HEADER_TEXT), "emoji": True}}


def section(mrkdwn: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": clip(mrkdwn, MAX_TEXT)}}


def field_sections(fields: Sequence[str]) -> list[dict[str, Any]]:
    """Sections of at most ten two-column fields each (Slack's limit per section)."""
    texts = [{"type": "mrkdwn", "text": clip(field, MAX_FIELD_TEXT)} for field in fields]
    return [{"type": "section", "fields": texts[i:i + MAX_FIELDS]} for i in range(0, len(texts), MAX_FIELDS)]


def context(elements: Iterable[str]) -> dict[str, Any]:
    texts = [{"type": "mrkdwn", "text": clip(text, MAX_TEXT)} for text in elements][:MAX_CONTEXT_ELEMENTS]
    return {"type": "context", "elements": texts}


def link_buttons(links: Mapping[str, Any]) -> dict[str, Any] | None:
    """Buttons opening `links` (label → URL); only http(s) URLs Slack can open, so none can break the message."""
    buttons = []
    for label, url in links.items():
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > MAX_URL:
            continue
        text = _LINK_LABELS.get(str(label), str(label))
        buttons.append({"type": "button", "text": {"type": "plain_text", "text": clip(text, MAX_BUTTON_TEXT)},
                        "url": url, "action_id": f"open-{len(buttons)}"})
    return {"type": "actions", "elements": buttons[:MAX_BUTTONS]} if buttons else None


def field(label: str, value: str) -> str:
    return f"*{label}*\n{value}"


def message(text: str, blocks: list[dict[str, Any]]) -> SlackMessage:
    return SlackMessage(text=clip(text, MAX_TEXT), blocks=blocks[:MAX_BLOCKS])


# --- messages ---------------------------------------------------------------------------------


def run_message(facts: RunFacts) -> SlackMessage:
    """One run's outcome: what happened, its cost against its cap, the budget it used, its metric, where to look."""
    emoji, words = _STATUS[facts.status]
    title = f"{facts.workload}: {facts.run_name} {words}"
    fields = [field("Status", words), field("Team / experiment", escape(f"{facts.team} / {facts.experiment}"))]
    if facts.cost_usd is not None:
        cap = f" of {usd(facts.cap_usd)} cap" if facts.cap_usd is not None else " (no cap)"
        fields.append(field("Cost", f"{usd(facts.cost_usd)}{cap}"))
    elif facts.cap_usd is not None:
        fields.append(field("Cap", usd(facts.cap_usd)))
    if facts.quote_usd is not None:
        fields.append(field("Quote", usd(facts.quote_usd)))
    if facts.budget_fraction is not None:
        fields.append(field("Budget", f"{percent(facts.budget_fraction)} used"))
    if facts.metric is not None:
        fields.append(field(escape(facts.metric.name), metric_text(facts.metric.name, facts.metric.value)))
    if facts.registered is not None:
        model = facts.registered
        alias = f" `{escape(model.alias)}`" if model.alias else ""
        fields.append(field("Model", f"{escape(model.name)} v{escape(str(model.version))}{alias}"))
    blocks = [header(f"{emoji} {title}")]
    if facts.headline.strip():
        blocks.append(section(escape(facts.headline)))
    blocks += field_sections(fields)
    about = [escape(f"workload {facts.workload}")]
    if facts.flow_run_id:
        about.append(escape(f"flow run {facts.flow_run_id}"))
    blocks.append(context(about))
    buttons = link_buttons({label: url for label, url in (("Prefect run", facts.prefect_url),
                                                         ("MLflow run", facts.mlflow_url)) if url})
    if buttons:
        blocks.append(buttons)
    cost = f" ({usd(facts.cost_usd)})" if facts.cost_usd is not None else ""
    return message(escape(f"{title}{cost}: {facts.headline}"), blocks)


def cost_report_message(title: str, rows: Sequence[CostRow | Mapping[str, Any]], total_usd: float, period: str,
                        links: Mapping[str, str] | None = None) -> SlackMessage:
    """A period's spend: the total, then the costliest team/experiment pairs in a fixed-width table."""
    report = sorted((CostRow.model_validate(row) for row in rows), key=lambda row: row.cost_usd, reverse=True)
    runs = sum(row.runs for row in report)
    shown, hidden = report[:MAX_REPORT_ROWS], report[MAX_REPORT_ROWS:]
    blocks = [header(f":bar_chart: {title}"),
              section(escape(f"{period}: {usd(total_usd)} over {runs} run{'s' * (runs != 1)}"))]
    if shown:
        lines = [f"{'team':<14} {'experiment':<22} {'runs':>5} {'cost':>12}"]
        lines += [f"{_cell(row.team, 14)} {_cell(row.experiment, 22)} {row.runs:>5} {usd(row.cost_usd):>12}"
                  for row in shown]
        blocks.append(section("```" + escape("\n".join(lines)) + "```"))
    if hidden:
        rest = sum(row.cost_usd for row in hidden)
        blocks.append(context([f"and {len(hidden)} more ({usd(rest)})"]))
    buttons = link_buttons(links or {})
    if buttons:
        blocks.append(buttons)
    return message(escape(f"{title}: {usd(total_usd)} over {runs} runs ({period})"), blocks)


def event_message(name: str, resource: Mapping[str, Any], payload: Mapping[str, Any]) -> SlackMessage:
    """Any event of the catalog (or outside it), as a title, who it is about, its figures and its links."""
    spec = CATALOG.get(name)
    title = name.removeprefix("oppen.").replace(".", " ").replace("-", " ").replace("_", " ")
    title = title[:1].upper() + title[1:]
    subject = _subject(resource)
    blocks = [header(f"{_EVENT_EMOJI.get(name, ':bell:')} {title}")]
    if subject:
        blocks.append(section(escape(subject)))
    order = list(spec.payload) if spec else []
    keys = [key for key in order if key in payload] + sorted(key for key in payload if key not in order)
    fields = [field(escape(key.replace("_", " ")), _figure(key, payload[key], payload))
              for key in keys if key != "links" and payload[key] is not None]
    blocks += field_sections(fields[:MAX_EVENT_FIELDS])
    notes = [f"_{escape(spec.when)}_"] if spec else []
    if len(fields) > MAX_EVENT_FIELDS:
        notes.append(f"and {len(fields) - MAX_EVENT_FIELDS} more figures")
    if notes:
        blocks.append(context(notes))
    links = payload.get("links")
    buttons = link_buttons(links) if isinstance(links, Mapping) else None
    if buttons:
        blocks.append(buttons)
    return message(escape(f"{title}: {subject}" if subject else title), blocks)


def _subject(resource: Mapping[str, Any]) -> str:
    """Who the event is about, from the resource's labels (oppen/events.py)."""
    if "oppen.model.name" in resource:
        alias = f" ({resource['oppen.model.alias']})" if resource.get("oppen.model.alias") else ""
        return f"model {resource['oppen.model.name']} v{resource.get('oppen.model.version', '?')}{alias}"
    parts = [str(resource.get(key)) for key in ("prefect.resource.name", "oppen.workload") if resource.get(key)]
    owner = "/".join(str(resource[key]) for key in ("oppen.team", "oppen.experiment") if resource.get(key))
    if owner:
        parts.append(f"({owner})")
    return " ".join(parts) or str(resource.get("prefect.resource.id", ""))


def _figure(key: str, value: Any, payload: Mapping[str, Any]) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if key.endswith("_usd"):
            return usd(float(value))
        if key in _FRACTION_KEYS:
            return percent(float(value))
        if key == "metric_value":
            return metric_text(payload.get("metric"), float(value))
        if key == "ratio":
            return f"{value:.1f}×"
        if key.endswith("_seconds"):
            return f"{value:.1f} s"
        return str(value) if isinstance(value, int) else f"{value:.4g}"
    if isinstance(value, str):
        return clip(escape(value), MAX_FIELD_TEXT - 50)
    return clip(escape(json.dumps(value, default=str)), MAX_FIELD_TEXT - 50)


def _cell(text: str, width: int) -> str:
    return (text if len(text) <= width else text[: width - 1] + "…").ljust(width)


def _texts(value: Any) -> Iterable[str]:
    """Every `text` string inside blocks, however deeply nested."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key == "text" and isinstance(item, str):
                yield item
            else:
                yield from _texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)
