"""Defer a deployment run to the next off-peak window: a new scheduled run of the same deployment, the saving stated."""

from __future__ import annotations

from datetime import datetime

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.runtime import deployment, flow_run
from pydantic import BaseModel, ConfigDict

from oppen.cost.ledger import utcnow
from oppen.cost.price_book import PriceBook
from oppen.cost.quote import Quote
from oppen.cost.windows import next_off_peak_start
from oppen.display import usd
from oppen.errors import RequestError

DEFERRED_TAG = "oppen-deferred"


class Deferral(BaseModel):
    model_config = ConfigDict(frozen=True)

    starts_at: datetime
    flow_run_id: str
    flow_run_name: str
    message: str


def deferral_message(book: PriceBook, starts_at: datetime, quote: Quote | None, now: datetime) -> str:
    """The saving in dollars when the history quotes the run, else the window's discount."""
    discount = book.off_peak.discount
    wait_h = (starts_at - now).total_seconds() / 3600
    when = f"{starts_at:%Y-%m-%d %H:%M} UTC (in {wait_h:.1f} h)"
    if quote is not None and quote.cheapest_start > quote.start:
        return (f"deferred to the off-peak window at {when}: quoted {usd(quote.expected_usd)} now, "
                f"{usd(quote.cheapest_usd)} then, saves {usd(quote.saving_usd)} "
                f"({quote.saving_usd / quote.expected_usd:.0%})")
    return (f"deferred to the off-peak window at {when}: the compute is {discount:.0%} cheaper then "
            "(no speed history for this request yet, so no dollar quote before loading)")


@task(cache_policy=NONE)
def defer_to_off_peak(book: PriceBook, quote: Quote | None) -> Deferral | None:
    """None inside the window (run now); otherwise schedule this deployment's run at the window's start."""
    from prefect.deployments import run_deployment

    now = utcnow()
    starts_at = next_off_peak_start(book.off_peak, now)
    if starts_at <= now:
        return None
    deployment_id = deployment.get_id()
    if not deployment_id:
        raise RequestError("cost.defer_to_off_peak reschedules a deployment run; this run has no deployment "
                           "(run it through `prefect deployment run` or the UI, or leave the option off)")
    parameters = dict(flow_run.get_parameters())
    later = run_deployment(deployment_id, parameters=parameters, scheduled_time=starts_at, timeout=0,
                           as_subflow=False, tags=[DEFERRED_TAG])
    message = deferral_message(book, starts_at, quote, now) + f"; run {later.name}"
    get_run_logger().info("%s", message)
    return Deferral(starts_at=starts_at, flow_run_id=str(later.id), flow_run_name=later.name, message=message)
