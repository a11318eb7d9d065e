"""Promotion rules for the model registry (pure logic, no MLflow): development → staging → production."""

from __future__ import annotations

from dataclasses import dataclass

STAGES = ("development", "staging", "production")


@dataclass(frozen=True)
class VersionScore:
    version: int
    metric: str | None
    value: float | None
    higher_is_better: bool
    aliases: tuple[str, ...] = ()

    def describe(self) -> str:
        score = f"{self.metric} {self.value:.4f}" if self.metric and self.value is not None else "no recorded score"
        return f"version {self.version} ({score})"


@dataclass(frozen=True)
class PromotionDecision:
    allowed: bool
    reason: str


def previous_stage(target: str) -> str:
    if target not in STAGES[1:]:
        raise ValueError(f"can promote to {' or '.join(STAGES[1:])}, not {target!r}")
    return STAGES[STAGES.index(target) - 1]


def _better(a: VersionScore, b: VersionScore) -> bool:
    """True when a scores strictly better than b on the same metric."""
    assert a.value is not None and b.value is not None
    return a.value > b.value if a.higher_is_better else a.value < b.value


def decide_promotion(
    candidate: VersionScore, target: str, incumbent: VersionScore | None, force: bool
) -> PromotionDecision:
    """May `candidate` take alias `target` from `incumbent` (its current holder, if any)?"""
    source = previous_stage(target)
    if incumbent is not None and incumbent.version == candidate.version:
        return PromotionDecision(False, f"{candidate.describe()} already holds {target!r}")
    if source not in candidate.aliases and not force:
        return PromotionDecision(
            False, f"{candidate.describe()} is not in {source!r}; promote it to {source!r} first or force"
        )
    if incumbent is None:
        return PromotionDecision(True, f"{candidate.describe()} becomes {target!r} (no version held it)")
    comparable = (
        candidate.metric is not None
        and candidate.metric == incumbent.metric
        and candidate.value is not None
        and incumbent.value is not None
    )
    if not comparable:
        if force:
            return PromotionDecision(True, f"forced: {candidate.describe()} replaces {incumbent.describe()} in {target!r}")
        return PromotionDecision(
            False,
            f"cannot compare {candidate.describe()} with {incumbent.describe()}, which holds {target!r}; "
            "pass force=true to replace it anyway",
        )
    if _better(incumbent, candidate):
        if force:
            return PromotionDecision(
                True, f"forced: {candidate.describe()} replaces the better-scoring {incumbent.describe()} in {target!r}"
            )
        return PromotionDecision(
            False,
            f"{incumbent.describe()} holds {target!r} and scores better than {candidate.describe()}; "
            "pass force=true to replace it anyway",
        )
    return PromotionDecision(True, f"{candidate.describe()} replaces {incumbent.describe()} in {target!r}")
