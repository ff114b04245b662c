"""Ctrl-C during training (aiayn.train.interrupt, the trainer's loop): the first SIGINT ends the
run after the update in progress with a checkpoint, and the command to continue is printed; the
resumed run ends bitwise where an uninterrupted one does."""

from __future__ import annotations

import os
import shlex
import signal

import pytest

from aiayn.cli import main
from aiayn.train import train
from aiayn.train.state import list_checkpoints
from aiayn.train.step import train_update

from helpers import COPY_CONFIG, TINY, assert_same_final_state

OPTS = TINY + ["model.dropout=0.1", "train.batch_tokens=300", "train.max_updates=12", "train.save_every=4",
               "train.valid_every=4", "train.valid_bleu_sentences=5", "train.log_every=2", "train.average_last=0"]


@pytest.fixture(scope="module")
def reference(small_copy, tmp_path_factory):
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    assert train(COPY_CONFIG, small_copy, out, OPTS).step == 12
    return out


@pytest.fixture(autouse=True)
def default_sigint():
    """Python's own SIGINT handler for each test, whatever the suite was started under: a job
    started in the background by a non-interactive shell inherits SIGINT ignored, and the
    trainer (rightly) leaves an ignored SIGINT ignored."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def interrupt_after(monkeypatch, update: int, times: int = 1) -> None:
    """Send this process SIGINT ``times`` times right after update number ``update`` (a real signal,
    at a fixed point of the run)."""
    import aiayn.train.trainer as trainer_mod

    calls = {"n": 0}

    def update_then_interrupt(*args, **kwargs):
        res = train_update(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == update:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return res

    monkeypatch.setattr(trainer_mod, "train_update", update_then_interrupt)


def resume_command(output: str) -> list[str]:
    """The one printed `aiayn train ... --resume` command, as arguments of `aiayn`."""
    lines = [line.strip() for line in output.splitlines() if line.strip().startswith("aiayn train ")]
    assert len(lines) == 1, output
    args = shlex.split(lines[0])
    assert args[:2] == ["aiayn", "train"] and "--resume" in args
    return args[1:]


def test_ctrl_c_saves_a_checkpoint_and_prints_the_command_that_resumes_exactly(small_copy, reference, tmp_path,
                                                                               monkeypatch, capsys):
    out = tmp_path / "run"
    interrupt_after(monkeypatch, 6)  # between the checkpoints of the schedule (4, 8)
    args = ["train", "--config", str(COPY_CONFIG), "--data", str(small_copy), "--out", str(out), *OPTS]
    assert main(args) == 130
    captured = capsys.readouterr()
    assert [p.name for p in list_checkpoints(out)] == ["step_0000004", "step_0000006"]
    assert "saved" in captured.err and "step_0000006" in captured.err + captured.out
    command = resume_command(captured.err + captured.out)
    monkeypatch.undo()
    assert main(command) == 0
    assert_same_final_state(out, reference)


def test_ctrl_c_twice_stops_at_once_without_saving_and_says_where_to_resume(small_copy, reference, tmp_path,
                                                                            monkeypatch, capsys):
    import aiayn.train.interrupt as interrupt_mod

    monkeypatch.setattr(interrupt_mod, "SECOND_PRESS_AFTER_S", 0.0)  # two presses in a row count twice
    out = tmp_path / "run"
    interrupt_after(monkeypatch, 6, times=2)
    args = ["train", "--config", str(COPY_CONFIG), "--data", str(small_copy), "--out", str(out), *OPTS]
    assert main(args) == 130
    captured = capsys.readouterr()
    assert [p.name for p in list_checkpoints(out)] == ["step_0000004"]  # nothing new was written
    assert "not saved" in captured.err and "step_0000004" in captured.err
    command = resume_command(captured.err + captured.out)
    monkeypatch.undo()
    assert main(command) == 0
    assert_same_final_state(out, reference)


def test_the_python_api_raises_training_interrupted_with_the_checkpoint(small_copy, tmp_path, monkeypatch):
    from aiayn.train import TrainingInterrupted

    interrupt_after(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted) as info:
        train({"model": {"dropout": 0.0}, "train": {"max_updates": 12, "warmup": 10}}, small_copy, tmp_path / "run",
              TINY + ["train.save_every=4"])
    e = info.value
    assert isinstance(e, KeyboardInterrupt) and e.saved and e.step == 3
    assert e.checkpoint == tmp_path / "run/checkpoints/step_0000003" and e.checkpoint.is_dir()
    # A config given as a mapping is continued from the run's own resolved config.
    assert shlex.split(e.command)[2:4] == ["--config", str(tmp_path / "run/config.yaml")]
