"""A tiny offline LM run on the real WikiText-2 files: perplexity goes down."""

import pytest

from training.config import RunConfig
from training.lm.data import TextDataError, read_local
from training.lm.workload import LmConfig, LmWorkload
from training.loop import train

pytestmark = pytest.mark.slow


def test_local_copy_without_train_file_trains_on_valid_and_evaluates_on_test(wikitext_dir):
    texts = read_local(wikitext_dir)
    assert (texts.train_split, texts.eval_split) == ("valid", "test")
    assert texts.is_local and " = " in texts.train[:200]


def test_missing_files_give_a_clear_error(tmp_path):
    with pytest.raises(TextDataError, match="wiki.valid.tokens"):
        read_local(tmp_path)


def test_tiny_offline_run_lowers_perplexity(wikitext_dir):
    config = LmConfig(
        data_dir=wikitext_dir, block_size=64, vocab_size=512, n_layer=1, n_head=2, n_embd=64,
        max_train_tokens=40_000, max_eval_tokens=8_192,
    )
    workload = LmWorkload.load(config)
    assert workload.model_kind == "scratch" and workload.vocab_size <= 512
    run = RunConfig(epochs=1, batch_size=16, learning_rate=3e-3, max_steps=30)
    model = workload.build_model()
    before = workload.evaluate(model, "val", model.device)["val_perplexity"]
    trained = train(workload, run)
    after = trained.result.val_metrics["val_perplexity"]
    assert after < 0.5 * before, (before, after)
    evaluation = workload.test(trained.model, trained.model.device)
    assert evaluation.primary_metric == "eval_perplexity" and evaluation.split == "test"
    assert evaluation.primary_value == pytest.approx(after, rel=1e-4)
