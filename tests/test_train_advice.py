"""What a run says at its start (aiayn.train.advice): which limit stops it, and warnings for a
vocabulary too large for the data and for a budget that ends inside the learning-rate warm-up."""

from __future__ import annotations

from aiayn.train import train
from aiayn.train.advice import MIN_TOKENS_PER_SUBWORD, stop_limits, vocabulary_warning, warmup_warning
from aiayn.train.config import TrainConfig

from helpers import COPY_CONFIG, TINY, one_second_updates, prepare_synthetic

OPTS = TINY + ["train.batch_tokens=300", "train.update_freq=2", "train.valid_every=0", "train.average_last=0",
               "train.valid_bleu_sentences=5"]


def start_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("aiayn")]


def test_stop_limits_name_the_limits_that_can_bind():
    def limits(epochs_end=None, elapsed_s=0.0, **fields):
        return stop_limits(TrainConfig(**fields), epochs_end=epochs_end, elapsed_s=elapsed_s)

    assert limits(max_updates=200) == "stops at update 200"
    assert limits(max_updates=200, max_minutes=10) == "stops at update 200 or after 10 minutes, whichever comes first"
    # An epoch limit that comes first hides max_updates, and the other way round; both are named
    # when they end within 5% of each other (an epoch's update count is an estimate).
    assert limits(max_updates=100000, max_epochs=2, epochs_end=27) == "stops after 2 epochs (about update 27)"
    assert limits(max_updates=20, max_epochs=2, epochs_end=27) == "stops at update 20"
    assert (limits(max_updates=26, max_epochs=2, epochs_end=27)
            == "stops at update 26 or after 2 epochs (about update 27), whichever comes first")
    assert limits(max_updates=200, max_minutes=10, elapsed_s=150) == (
        "stops at update 200 or after 10 minutes of training (2.5 done), whichever comes first")
    assert (limits(max_updates=1000, max_epochs=1, epochs_end=13, max_minutes=0.5, patience=3)
            == "stops after 1 epoch (about update 13), after 0.5 minutes or after 3 validations in a row without a "
               "better BLEU, whichever comes first")


def test_the_start_of_a_run_names_its_binding_limits(small_copy, tmp_path, capsys):
    train(COPY_CONFIG, small_copy, tmp_path / "a", OPTS + ["train.max_updates=3", "train.max_minutes=10"])
    assert "aiayn train: stops at update 3 or after 10 minutes, whichever comes first" in start_lines(capsys.readouterr().err)
    # 27 micro-batches of 150 tokens per epoch, 2 per update
    train(COPY_CONFIG, small_copy, tmp_path / "b", OPTS + ["train.max_updates=1000", "train.max_epochs=1"])
    assert "aiayn train: stops after 1 epoch (about update 13)" in start_lines(capsys.readouterr().err)


def test_vocabulary_warning_threshold():
    # 10.5 training tokens per subword: a 3,000-pair corpus with an 8,000-subword vocabulary
    text = vocabulary_warning(8000, 84_000)
    assert text.startswith("the vocabulary has 8000 subwords for 84000 training tokens")
    assert f"fewer than {MIN_TOKENS_PER_SUBWORD}" in text and "--vocab-size" in text and "small-data" in text
    assert vocabulary_warning(8000, 8000 * MIN_TOKENS_PER_SUBWORD) is None
    assert vocabulary_warning(8000, 8000 * MIN_TOKENS_PER_SUBWORD - 1) is not None


def test_a_vocabulary_large_for_the_data_is_warned_about(small_copy, tmp_path, capsys):
    tiny = prepare_synthetic(tmp_path / "tiny", "copy", "--train-size", "20", "--valid-size", "10", "--test-size", "10")
    capsys.readouterr()
    train(COPY_CONFIG, tiny, tmp_path / "tiny-run", OPTS + ["train.max_updates=2", "train.warmup=1"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("aiayn: warning:")]
    assert len(warnings) == 1 and "the vocabulary has 45 subwords" in warnings[0]
    # 300 pairs: about 150 tokens for each of the 45 symbols, no warning
    train(COPY_CONFIG, small_copy, tmp_path / "run", OPTS + ["train.max_updates=2", "train.warmup=1"])
    assert "aiayn: warning" not in capsys.readouterr().err


def test_warmup_warning():
    assert warmup_warning(400, 400, "the run ends at update 400") is not None
    assert warmup_warning(401, 400, "the run ends at update 401") is None
    text = warmup_warning(200, 400, "the run ends at update 200")
    assert text.startswith("the run ends at update 200, inside the learning-rate warm-up (train.warmup=400)")
    assert "train.warmup=50" in text  # a quarter of the run


def test_an_update_budget_inside_the_warmup_is_warned_about(small_copy, tmp_path, capsys):
    train(COPY_CONFIG, small_copy, tmp_path / "run", OPTS + ["train.max_updates=5"])  # copy.yaml: warmup 100
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("aiayn: warning:")]
    assert len(warnings) == 1 and "update 5, inside the learning-rate warm-up (train.warmup=100)" in warnings[0]


def test_a_time_budget_is_projected_from_the_first_updates(small_copy, tmp_path, monkeypatch, capsys):
    """A fake clock: every update takes one second, so a 1-minute budget ends at update 60, inside
    copy.yaml's 100-update warm-up; the run says so after its first updates, once."""
    one_second_updates(monkeypatch)
    result = train(COPY_CONFIG, small_copy, tmp_path / "run", OPTS + ["train.max_minutes=1"])
    assert result.step == 60
    lines = start_lines(capsys.readouterr().err)
    assert sum("near update 60" in line for line in lines) == 1
    warnings = [line for line in lines if line.startswith("aiayn: warning:")]
    assert len(warnings) == 1
    assert "the 1-minute budget ends near update 60, inside the learning-rate warm-up (train.warmup=100)" in warnings[0]
