"""How Oppen shows figures to people, the same in the terminal, Prefect, MLflow and Slack.

Money: every micro-dollar under $1, cents above ($0.000291, $12.4130, $1,250.00), never a float's
eight digits. Fractions as percentages. A workload's metric by its name in words ("test accuracy
99.15%", "eval perplexity 245.0"), never as a snake_case key.
"""

from __future__ import annotations

import math

from oppen.cost.money import format_usd, to_micros


def usd(value: float | None) -> str:
    """Oppen's dollar format (the CLI's and the Completed message's): every micro-dollar under $1, cents above."""
    if value is None or not math.isfinite(value):
        return "n/a"
    sign = "-" if value < 0 else ""  # a refund or correction; money.to_micros refuses negatives
    return sign + format_usd(to_micros(abs(value)))


def percent(fraction: float | None) -> str:
    if fraction is None or not math.isfinite(fraction):
        return "n/a"
    if 0 < fraction < 0.001:
        return "<0.1%"  # "0.0%" would read as "nothing used"
    if fraction >= 10:
        return f"{fraction:,.0f}x"  # "125274.0%" of a one-micro-dollar budget says nothing more than "125,274x"
    return f"{fraction:.1%}"


def signed_percent(fraction: float | None) -> str:
    """An error or a change: +2.3%, -11.1%."""
    if fraction is None or not math.isfinite(fraction):
        return "n/a"
    return f"{fraction:+.1%}"


def metric_text(name: str | None, value: float) -> str:
    """Accuracy as a percentage, perplexity to one decimal, anything else to four."""
    if not math.isfinite(value):
        return str(value)  # a diverged run's nan or inf, said plainly
    lowered = (name or "").lower()
    if "accuracy" in lowered:
        return f"{value:.2%}"
    if "perplexity" in lowered:
        return f"{value:.1f}"
    return f"{value:.4f}"


def metric_label(name: str | None) -> str:
    """test_accuracy → "test accuracy", val/perplexity → "val perplexity"."""
    return (name or "metric").replace("/", " ").replace("_", " ")


def metric_phrase(name: str | None, value: float) -> str:
    """"test accuracy 99.15%": a metric as a person reads it."""
    return f"{metric_label(name)} {metric_text(name, value)}"


def duration(seconds: float | None) -> str:
    """12.3 s, 4 min 05 s, 2 h 03 min."""
    if seconds is None or not math.isfinite(seconds):
        return "n/a"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
