"""Registry promotion rules (pure)."""

import pytest

from oppen.promotion import VersionScore, decide_promotion, previous_stage


def v(version, value, aliases=(), metric="test_accuracy", higher=True):
    return VersionScore(version, metric, value, higher, tuple(aliases))


def test_stages_follow_development_staging_production():
    assert previous_stage("staging") == "development"
    assert previous_stage("production") == "staging"
    with pytest.raises(ValueError):
        previous_stage("development")


def test_empty_target_accepts_a_version_from_the_previous_stage():
    assert decide_promotion(v(1, 0.99, ["development"]), "staging", None, force=False).allowed


def test_skipping_a_stage_is_refused_unless_forced():
    decision = decide_promotion(v(1, 0.99, ["development"]), "production", None, force=False)
    assert not decision.allowed and "not in 'staging'" in decision.reason
    assert decide_promotion(v(1, 0.99, ["development"]), "production", None, force=True).allowed


def test_better_incumbent_is_kept_and_the_reason_says_why():
    decision = decide_promotion(v(2, 0.985, ["development"]), "staging", v(1, 0.991, ["staging"]), force=False)
    assert not decision.allowed
    assert "version 1 (test_accuracy 0.9910)" in decision.reason and "scores better" in decision.reason
    assert "force" in decision.reason


def test_force_replaces_a_better_incumbent():
    decision = decide_promotion(v(2, 0.985, ["development"]), "staging", v(1, 0.991, ["staging"]), force=True)
    assert decision.allowed and decision.reason.startswith("forced")


def test_equal_or_better_candidate_replaces_incumbent():
    assert decide_promotion(v(2, 0.991, ["development"]), "staging", v(1, 0.991, ["staging"]), False).allowed


def test_lower_is_better_metrics_compare_the_other_way():
    ppl = lambda n, x, a=(): v(n, x, a, metric="eval_perplexity", higher=False)  # noqa: E731
    assert decide_promotion(ppl(2, 40.0, ["development"]), "staging", ppl(1, 50.0, ["staging"]), False).allowed
    assert not decide_promotion(ppl(2, 60.0, ["development"]), "staging", ppl(1, 50.0, ["staging"]), False).allowed


def test_incomparable_metrics_are_refused_unless_forced():
    other = VersionScore(1, "val_accuracy", 0.99, True, ("staging",))
    assert not decide_promotion(v(2, 0.98, ["development"]), "staging", other, False).allowed


def test_promoting_the_holder_again_is_a_refusal_with_reason():
    decision = decide_promotion(v(1, 0.99, ["development", "staging"]), "staging", v(1, 0.99, ["staging"]), False)
    assert not decision.allowed and "already holds" in decision.reason
