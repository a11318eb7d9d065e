"""The budgets file (teams, team budgets, experiment budgets) and its idempotent apply to the ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, field_validator

from oppen.cost.ledger import Ledger
from oppen.cost.policy import MAX_BUDGET_USD, check_name
from oppen.cost.price_book import load_yaml_model

ENV_VAR = "OPPEN_BUDGETS_FILE"
DEFAULT_FILE = Path(__file__).with_name("budgets.yaml")
# A channel name as Slack spells it (lowercase, digits, '-', '_', '.', at most 80) or a public/private
# channel id; anything else would only fail at post time, in the middle of a run.
SLACK_CHANNEL_PATTERN = r"^(#[a-z0-9][a-z0-9._-]{0,79}|[CG][A-Z0-9]{8,})$"


class BudgetSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    amount_usd: PositiveFloat = Field(le=MAX_BUDGET_USD)
    period: Literal["total", "monthly"] = "monthly"


class TeamSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    budget: BudgetSpec
    experiments: dict[str, BudgetSpec] = Field(default_factory=dict)
    slack_channel: str | None = Field(
        None, pattern=SLACK_CHANNEL_PATTERN,
        description="Where this team's run messages go with a bot token ('#name' or a channel id); none: "
        "OPPEN_SLACK_CHANNEL. Not a budget: apply_budgets leaves it out of the ledger.",
    )

    @field_validator("experiments")
    @classmethod
    def _within_team(cls, experiments: dict[str, BudgetSpec], info) -> dict[str, BudgetSpec]:
        for name in experiments:
            if not name.strip():
                raise ValueError("experiment names must not be empty")
        return experiments


class BudgetsFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    teams: dict[str, TeamSpec] = Field(min_length=1)

    @field_validator("teams")
    @classmethod
    def _names(cls, teams: dict[str, TeamSpec]) -> dict[str, TeamSpec]:
        for name in teams:
            check_name("team", name)
        return teams


def load_budgets(path: Path | None = None) -> BudgetsFile:
    return load_yaml_model(BudgetsFile, "budgets file", path, ENV_VAR, DEFAULT_FILE)


def apply_budgets(ledger: Ledger, spec: BudgetsFile) -> list[str]:
    """Create or update every team and budget in one transaction; returns what changed (empty: no-op)."""
    changes: list[str] = []
    with ledger.transaction() as conn:
        for team, team_spec in spec.teams.items():
            if ledger.upsert_team(team, conn):
                changes.append(f"team {team}: created")
            scoped = {"": team_spec.budget} | team_spec.experiments
            for experiment, budget in scoped.items():
                outcome = ledger.set_budget(team, budget.amount_usd, budget.period, experiment, conn)
                if outcome != "unchanged":
                    label = f"{team}/{experiment}" if experiment else team
                    changes.append(f"budget {label}: {outcome} (${budget.amount_usd:,.2f} {budget.period})")
    return changes


def open_ledger(url: str, budgets_file: Path | None = None) -> Ledger:
    """The ledger at `url`, with its tables; a ledger with no teams yet gets the budgets file applied."""
    ledger = Ledger(url)
    ledger.create_schema()
    if not ledger.team_names():
        apply_budgets(ledger, load_budgets(budgets_file))
    return ledger
