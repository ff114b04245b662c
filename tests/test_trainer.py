"""The training loop and its run directory (aiayn.train.trainer): the copy task, logs, checkpoints,
exact resume after SIGKILL, what --resume refuses, progress and the clock. Models are tiny; data is
synthetic."""

from __future__ import annotations

import dataclasses
import io
import json
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from aiayn.cli import main
from aiayn.data import load_dataset
from aiayn.errors import UserError
from aiayn.train import resolve_config, train
from aiayn.train.config import load_raw_config
from aiayn.train.state import list_checkpoints
from aiayn.train.step import train_update

from helpers import COPY_CONFIG, FP32, REPO, TINY, assert_same_final_state, one_second_updates, poison_decoder


def test_repeated_nonfinite_updates_stop_with_a_clear_message(copy_dataset, tmp_path, monkeypatch):
    import aiayn.train.trainer as trainer_mod

    real = trainer_mod.train_update
    calls = {"n": 0}

    def nan_update(model, optimizer, batches, lr, ctx):
        calls["n"] += 1
        if calls["n"] <= 2:  # two good updates, then only NaN
            return real(model, optimizer, batches, lr, ctx)
        hook = poison_decoder(model.model, float("inf"))  # the trainer passes its Criterion
        try:
            return real(model, optimizer, batches, lr, ctx)
        finally:
            hook.remove()

    monkeypatch.setattr(trainer_mod, "train_update", nan_update)
    with pytest.raises(UserError, match="diverged: 3 consecutive"):
        train(REPO / "configs/copy.yaml", copy_dataset, tmp_path / "run",
              TINY + ["train.max_updates=20", "train.max_nonfinite=3", "train.batch_tokens=300"])
    log = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "skip" for r in log) == 3


def test_copy_task_learns_to_copy(copy_run):
    """The run's own log agrees with what tests/conftest.py checked: its last validation (of the
    final weights) has near-perfect teacher-forced accuracy and greedy BLEU. No clock is read:
    how long training takes depends on the machine and its load."""
    log = [json.loads(line) for line in (copy_run.out_dir / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in log if r["kind"] == "valid"]
    assert valid[-1]["step"] == copy_run.step
    assert valid[-1]["accuracy"] >= 0.99 and valid[-1]["bleu"] > 95
    train_recs = [r for r in log if r["kind"] == "train"]
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    assert all(r["tgt_tokens_per_s"] > 0 and r["lr"] > 0 and r["ppl"] >= 1 for r in train_recs)


def test_run_directory_layout(copy_run):
    from aiayn.checkpoint import load_checkpoint

    out = copy_run.out_dir
    assert (out / "config.yaml").is_file() and (out / "tb").is_dir()
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    ckpts = list_checkpoints(out)
    # copy.yaml: save_every 200, keep_last 4; the fixture may have continued the run past 800
    # updates, in rounds of 200.
    assert copy_run.step >= 800 and copy_run.step % 200 == 0
    assert [p.name for p in ckpts] == [f"step_{copy_run.step - 200 * k:07d}" for k in (3, 2, 1, 0)]
    assert (out / "last").resolve() == ckpts[-1].resolve()
    assert (out / "last.txt").read_text().strip() == f"checkpoints/{ckpts[-1].name}"
    for name in ("model.safetensors", "config.yaml", "spm.model", "meta.json", "optimizer.safetensors",
                 "rng.safetensors", "trainer_state.json"):
        assert (ckpts[-1] / name).is_file(), name
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert state["step"] == copy_run.step and "position" in state["sampler"]
    assert load_file(str(ckpts[-1] / "rng.safetensors"))["cpu.rank0"].dtype == torch.uint8
    ckpt = load_checkpoint(out / "best")
    assert ckpt.meta["valid"]["bleu"] == copy_run.best_bleu
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "start" and 0.5 < records[0]["padding_efficiency"] <= 1.0
    assert records[-1]["kind"] == "end"
    # The resolved config can be given back as --config.
    raw = load_raw_config(out / "config.yaml", [])
    assert resolve_config(raw, ckpt.model.config.src_vocab_size).model == ckpt.model.config


def test_existing_run_directory_needs_resume_or_force(copy_dataset, tmp_path, capsys):
    from aiayn.cli import main

    out = tmp_path / "run"
    args = ["train", "--config", str(REPO / "configs/copy.yaml"), "--data", str(copy_dataset), "--out", str(out)]
    assert main(args + TINY + ["train.max_updates=2", "train.save_every=1", "train.keep_last=2"]) == 0
    assert main(args + TINY + ["train.max_updates=2"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(out)] == ["step_0000001", "step_0000002"]
    assert main(args + ["--force"] + TINY + ["train.max_updates=2", "train.average_last=2"]) == 0
    assert [p.name for p in list_checkpoints(out)] == ["step_0000002"]  # a new run
    assert not (out / "averaged").exists()  # one checkpoint: nothing to average
    # A directory the user made is not a run: neither --resume nor --force touches it.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "something").write_text("x")
    for flag in ("--resume", "--force"):
        assert main(["train", "--config", str(REPO / "configs/copy.yaml"), "--data", str(copy_dataset), "--out",
                     str(mine), flag] + TINY + ["train.max_updates=2"]) == 2
        assert "is not a directory aiayn wrote (it holds something)" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["something"]


KILL_WHILE_SAVING_60 = """
import os, signal, sys
import aiayn.train.state as state
from aiayn.cli import main
real_save_file = state.save_file
def save_file(tensors, filename, *args, **kwargs):
    if ".step_0000060" in str(filename):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save_file(tensors, filename, *args, **kwargs)
state.save_file = save_file
sys.exit(main(sys.argv[1:]))
"""


def test_killed_and_resumed_run_ends_bitwise_equal(copy_dataset, tmp_path):
    # Dropout on, so the RNG state must be restored too; several validations and checkpoints.
    # A cool-down over the second half of the run: its rate follows the update count, so it resumes exactly.
    overrides = TINY + ["model.dropout=0.1", "train.max_updates=120", "train.cooldown=0.5", "train.save_every=20",
                        "train.valid_every=40", "train.valid_bleu_sentences=10", "train.batch_tokens=400",
                        "train.log_every=10", "train.keep_last=10", "train.average_last=0"]
    config = REPO / "configs/copy.yaml"
    reference = train(config, copy_dataset, tmp_path / "reference", overrides)
    assert reference.step == 120

    # The run kills itself with SIGKILL while it writes checkpoint 60: at a fixed point, not
    # when a polling parent gets round to it (on a loaded machine the run could finish first).
    # By then metrics.jsonl has records past the last finished checkpoint (40) and a
    # half-written '.step_0000060' directory lies beside it.
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", KILL_WHILE_SAVING_60, "train", "--config", str(config), "--data", str(copy_dataset),
           "--out", str(out), *overrides]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-3000:]
    assert [p.name for p in list_checkpoints(out)] == ["step_0000020", "step_0000040"]
    assert list((out / "checkpoints").glob(".step_0000060*"))

    resumed = train(config, copy_dataset, out, overrides, resume=True)
    assert resumed.step == 120
    final_ref = load_file(str(tmp_path / "reference/checkpoints/step_0000120/model.safetensors"))
    final = load_file(str(out / "checkpoints/step_0000120/model.safetensors"))
    assert final.keys() == final_ref.keys()
    for key in final:
        assert torch.equal(final[key], final_ref[key]), key
    opt_ref = load_file(str(tmp_path / "reference/checkpoints/step_0000120/optimizer.safetensors"))
    opt = load_file(str(out / "checkpoints/step_0000120/optimizer.safetensors"))
    assert all(torch.equal(opt[k], opt_ref[k]) for k in opt_ref)
    # The metrics log holds each update once, as if the run had not been interrupted.
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"train"' in line]
    assert steps == list(range(10, 121, 10))


def test_resume_refuses_a_different_model(copy_run, copy_dataset, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(copy_run.out_dir, out, symlinks=True)
    with pytest.raises(UserError, match="model config differs.*d_model"):
        train(REPO / "configs/copy.yaml", copy_dataset, out, ["model.d_model=32", "train.progress=false"], resume=True)


def test_training_data_longer_than_learned_positions_is_a_clear_error(copy_run, copy_dataset, tmp_path):
    """Checked before the run directory is touched: --force does not lose the run it would replace."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(copy_run.out_dir, out, symlinks=True)
    with pytest.raises(UserError, match=r"up to 20 subwords.*max_positions 12.*--max-len 11"):
        train(REPO / "configs/copy.yaml", copy_dataset, out,
              TINY + ["model.positions=learned", "model.max_positions=12"], force=True)
    assert list_checkpoints(out)


def test_resume_refuses_another_dataset_or_tokenizer(copy_dataset, tmp_path):
    """The checkpoint's data position, vocabulary and embedding rows refer to the dataset and
    subword model the run started with; --resume with others is a one-line error naming them."""
    import shutil

    from aiayn.cli import main

    out = tmp_path / "run"
    train(REPO / "configs/copy.yaml", copy_dataset, out, TINY + ["train.max_updates=2"])
    other = tmp_path / "other"  # the same task and sizes, another seed
    assert main(["prepare", "--corpus", "copy", "--seed", "2", "--out", str(other)]) == 0
    with pytest.raises(UserError, match=rf"^{other}: cannot resume {out} with this dataset: dataset fingerprint"):
        train(REPO / "configs/copy.yaml", other, out, TINY + ["train.max_updates=4"], resume=True)
    retokenized = tmp_path / "retokenized"  # the same manifest, another subword model
    shutil.copytree(copy_dataset, retokenized)
    assert main(["prepare", "--corpus", "reverse", "--out", str(tmp_path / "reverse"), "--vocab-size", "60"]) == 0
    shutil.copyfile(tmp_path / "reverse/spm.model", retokenized / "spm.model")
    with pytest.raises(UserError, match=r"this dataset: its tokenizer \(spm.model\) is not the run's \(checkpoint step_0000002\)"):
        train(REPO / "configs/copy.yaml", retokenized, out, TINY + ["train.max_updates=4"], resume=True)
    train(REPO / "configs/copy.yaml", copy_dataset, out, TINY + ["train.max_updates=4"], resume=True)
    assert [p.name for p in list_checkpoints(out)] == ["step_0000002", "step_0000004"]


def test_checkpoint_meta_holds_no_local_paths(copy_dataset, tmp_path):
    """Checkpoints are copied between machines: meta.json names the run and the dataset, it does
    not carry this machine's paths."""
    from aiayn.cli import main

    out = tmp_path / "run"
    train(REPO / "configs/copy.yaml", copy_dataset, out, TINY + ["train.max_updates=2", "train.save_every=1",
                                                                 "train.valid_every=1", "train.average_last=2"])
    assert main(["average", "--out", str(tmp_path / "avg"), str(out), "--last", "2"]) == 0
    paths = [out / "best/meta.json", out / "averaged/meta.json", *out.glob("checkpoints/*/meta.json"),
             tmp_path / "avg/meta.json"]
    metas = {path: json.loads(path.read_text()) for path in paths}
    assert len(metas) == 5  # best, averaged, two checkpoints, avg

    def strings(value):
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    for path, meta in metas.items():
        found = [s for s in strings(meta) if s.startswith(("/", "~")) or str(tmp_path) in s or "\\" in s]
        assert not found, f"{path}: {found}"
        assert meta["run"] == "run" and meta["data"] == copy_dataset.name
        assert meta["data_fingerprint"] == load_dataset(copy_dataset).manifest["fingerprint"]
    assert metas[tmp_path / "avg/meta.json"]["averaged_from"] == ["step_0000001", "step_0000002"]


class Terminal(io.StringIO):
    """A standard error that says it is a terminal: progress is a tqdm bar there."""

    def isatty(self) -> bool:
        return True


def test_progress_bar_counts_the_time_budget(copy_dataset, tmp_path, monkeypatch):
    """Under train.max_minutes the bar's total is the budget in seconds and it advances with the
    elapsed time (updates in the postfix); without a budget it counts updates to max_updates."""
    import tqdm

    monkeypatch.setattr(sys, "stderr", Terminal())
    bars = []

    class Recorded(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm, "tqdm", Recorded)
    base = TINY + ["train.progress=true", "train.valid_every=0", "train.average_last=0"]
    result = train(REPO / "configs/copy.yaml", copy_dataset, tmp_path / "budget",
                   base + ["train.max_minutes=0.02", "train.max_updates=100000"])
    assert result.stop_reason == "max_minutes"
    bar, = bars
    assert (bar.total, bar.unit) == (pytest.approx(1.2), "s")
    assert bar.n == pytest.approx(bar.total)  # the run stops when the budget is spent
    assert f"upd={result.step}" in bar.postfix
    bars.clear()
    result = train(REPO / "configs/copy.yaml", copy_dataset, tmp_path / "updates", base + ["train.max_updates=3"])
    bar, = bars
    assert (bar.total, bar.unit, bar.n) == (3, "upd", 3)


def test_time_cadence_saves_and_validates_by_the_clock(copy_dataset, tmp_path, monkeypatch):
    """save_every_minutes / valid_every_minutes: checkpoints and validations follow elapsed time,
    not the update count. A fake clock makes every update take exactly one second."""
    one_second_updates(monkeypatch)
    result = train(REPO / "configs/copy.yaml", copy_dataset, tmp_path / "run",
                   TINY + ["train.max_updates=10", "train.save_every=1000", "train.valid_every=1000",
                           "train.save_every_minutes=0.05", "train.valid_every_minutes=0.1",  # 3 s, 6 s
                           "train.keep_last=10", "train.average_last=3", "train.valid_bleu_sentences=2"])
    assert result.step == 10
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == [
        "step_0000003", "step_0000006", "step_0000009", "step_0000010"]  # the last one: the end of the run
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "valid"] == [6, 10]
    meta = json.loads((tmp_path / "run/averaged/meta.json").read_text())
    assert meta["averaged_from"] == ["step_0000006", "step_0000009", "step_0000010"]


def _train_lrs(out) -> list[float]:
    return [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_cooldown_takes_the_rate_linearly_to_zero_at_the_end_of_either_budget(copy_dataset, tmp_path, monkeypatch,
                                                                             capsys):
    """train.cooldown=0.5: §5.3's rate until half the budget is spent, then times (1 - progress) / 0.5,
    where progress counts the updates (max_updates) or the clock (max_minutes), whichever is ahead.
    The fake clock makes every update take one second; copy.yaml has lr_factor 0.5."""
    from aiayn.train import inverse_sqrt_lr

    one_second_updates(monkeypatch)
    base = TINY + ["train.log_every=1", "train.valid_every=0", "train.average_last=0", "train.warmup=4",
                   "train.cooldown=0.5"]

    def expected(steps: int) -> list[float]:
        return [inverse_sqrt_lr(s, 32, 4, 0.5) * min(1.0, (1 - (s - 1) / steps) / 0.5) for s in range(1, steps + 1)]

    result = train(COPY_CONFIG, copy_dataset, tmp_path / "updates", base + ["train.max_updates=10"])
    assert result.step == 10
    lrs = _train_lrs(tmp_path / "updates")
    assert lrs == pytest.approx(expected(10), rel=1e-12)
    assert lrs[:6] == pytest.approx([inverse_sqrt_lr(s, 32, 4, 0.5) for s in range(1, 7)], rel=1e-12)
    assert lrs[-1] == pytest.approx(0.2 * inverse_sqrt_lr(10, 32, 4, 0.5), rel=1e-12)  # (1 - 9/10) / 0.5
    err = capsys.readouterr().err
    assert "the learning rate falls linearly to zero over the last 50% of the budget (update 10" in err

    # A 12-second budget and no update limit to speak of: the clock sets the schedule.
    result = train(COPY_CONFIG, copy_dataset, tmp_path / "minutes", base + ["train.max_minutes=0.2"])
    assert (result.step, result.stop_reason) == (12, "max_minutes")
    assert _train_lrs(tmp_path / "minutes") == pytest.approx(expected(12), rel=1e-12)


def test_cooldown_warns_when_max_epochs_ends_the_run_first(copy_dataset, tmp_path, capsys):
    train(COPY_CONFIG, copy_dataset, tmp_path / "run", TINY + ["train.max_epochs=1", "train.max_updates=100000",
                                                               "train.cooldown=0.2", "train.valid_every=0"])
    err = capsys.readouterr().err
    assert "aiayn: warning: max_epochs ends the run near update" in err
    assert "before the cool-down" in err


# ---------------------------------------------------------------------------------------------
# Stopping at a limit and resuming == not stopping
# ---------------------------------------------------------------------------------------------


# Dropout on (the RNG state must carry over), two micro-batches per update.
EXACT = TINY + ["model.dropout=0.1", "train.batch_tokens=300", "train.update_freq=2", "train.max_updates=100",
                "train.log_every=5", "train.valid_bleu_sentences=5", "train.save_every=1000", "train.keep_last=50",
                "train.average_last=0"]


class ScriptedRun:
    """A fake clock (every update takes exactly one second, nothing else takes time) and a scripted
    valid BLEU: 20 at update ``best_step``, 15 at every other (the real validation runs; only its
    BLEU is replaced), so patience decides deterministically where a run stops."""

    def __init__(self, monkeypatch, best_step: int):
        import aiayn.train.trainer as trainer_mod

        self.clock, self.updates, self.best_step = 0.0, 0, best_step
        real_validate = trainer_mod.validate
        run = self

        class FakeTime:
            @staticmethod
            def perf_counter() -> float:
                return run.clock

        def update(*args, **kwargs):
            self.clock += 1.0
            res = train_update(*args, **kwargs)
            self.updates += 0 if res.skipped else 1
            return res

        def validate(*args, **kwargs):
            res = real_validate(*args, **kwargs)
            res.bleu = 20.0 if self.updates == self.best_step else 15.0
            return res

        monkeypatch.setattr(trainer_mod, "time", FakeTime)
        monkeypatch.setattr(trainer_mod, "train_update", update)
        monkeypatch.setattr(trainer_mod, "validate", validate)

    def train(self, data, out, overrides, **kwargs):
        return train(COPY_CONFIG, data, out, EXACT + overrides, **kwargs)


# common overrides, the first session's, the resumed session's (= the reference run's), the best
# validation's update, and what stops the reference run
STOPS = {
    # 27 micro-batches per epoch: update 14 takes the last of epoch 0 and the first of epoch 1.
    "max_epochs": (["train.valid_every=5"], ["train.max_epochs=1"], ["train.max_epochs=2"], 0, "max_epochs"),
    # The first session ends between validations (at 10) and validates there; patience counts only
    # the validations of the schedule (4, 8, 12, ...), so both runs stop at 20.
    "max_updates": (["train.valid_every=4", "train.patience=3"], ["train.max_updates=10"], [], 8, "patience"),
    "patience": (["train.valid_every=4"], ["train.patience=2"], ["train.patience=3"], 8, "patience"),
    # Validations every 6 s of training; the first session's 9 s budget ends between two of them, and
    # its validation at the end moves neither the schedule (12, 18) nor patience.
    "max_minutes": (["train.valid_every=0", "train.valid_every_minutes=0.1", "train.patience=2", "train.max_minutes=1"],
                    ["train.max_minutes=0.15"], [], 6, "patience"),
}


@pytest.mark.parametrize("limit", list(STOPS))
def test_stopping_at_a_limit_and_resuming_equals_one_run(limit, small_copy, tmp_path, monkeypatch):
    """A run stopped by max_epochs, max_updates, max_minutes or patience and resumed with that limit
    raised ends bitwise where one run with the raised limit ends: no training data is skipped or
    repeated, and the extra validation at the end of a session changes no decision."""
    from aiayn.data import TokenBatchSampler

    common, first, then, best_step, reference_stop = STOPS[limit]
    train_split = load_dataset(small_copy).split("train")
    sampler = TokenBatchSampler(train_split.src_lens, train_split.tgt_lens, 150, seed=1)
    assert len(sampler.batches(0)) == 27  # the straddling update the max_epochs case is about

    reference = ScriptedRun(monkeypatch, best_step).train(small_copy, tmp_path / "reference", common + then)
    assert reference.stop_reason == reference_stop
    run = ScriptedRun(monkeypatch, best_step)
    stopped = run.train(small_copy, tmp_path / "stopped", common + first)
    assert stopped.stop_reason == limit and 0 < stopped.step < reference.step
    resumed = run.train(small_copy, tmp_path / "stopped", common + then, resume=True)
    assert (resumed.step, resumed.stop_reason) == (reference.step, reference.stop_reason)
    assert_same_final_state(tmp_path / "stopped", tmp_path / "reference")


# ---------------------------------------------------------------------------------------------
# Progress on standard error
# ---------------------------------------------------------------------------------------------


def test_a_redirected_training_log_gets_plain_lines_not_frames(small_copy, tmp_path, capsys):
    """Standard error is not a terminal here (captured): the trainer's progress is aiayn.progress's
    plain lines (one every PLAIN_EVERY_S seconds and one at the end), not a bar's frames."""
    train(COPY_CONFIG, small_copy, tmp_path / "run",
          EXACT + ["train.progress=true", "train.max_updates=40", "train.valid_every=20", "train.log_every=1"])
    err = capsys.readouterr().err
    assert "\r" not in err
    progress = [line for line in err.splitlines() if line.startswith("train")]
    assert 1 <= len(progress) <= 3, err  # a 40-update run takes seconds: the line at the end, maybe one more
    assert "40/40 upd" in progress[-1] and "loss=" in progress[-1]


def test_the_progress_display_says_validating_while_validation_runs(small_copy, tmp_path, monkeypatch):
    import aiayn.progress as progress_mod
    import aiayn.train.trainer as trainer_mod

    bars, seen = [], []
    real_bar, real_validate = progress_mod.progress_bar, trainer_mod.validate

    def recorded_bar(*args, **kwargs):
        bars.append(real_bar(*args, **kwargs))
        return bars[-1]

    def validate(*args, **kwargs):
        seen.append((bars[-1].desc, bars[-1].postfix))
        return real_validate(*args, **kwargs)

    monkeypatch.setattr(progress_mod, "progress_bar", recorded_bar)
    monkeypatch.setattr(trainer_mod, "validate", validate)
    train(COPY_CONFIG, small_copy, tmp_path / "run", EXACT + ["train.progress=true", "train.max_updates=6",
                                                               "train.valid_every=3"])
    assert len(seen) == 2 and all("validating" in f"{desc} {postfix}" for desc, postfix in seen)
    bar, = bars
    assert "validating" not in f"{bar.desc} {bar.postfix}"  # training again after each


# ---------------------------------------------------------------------------------------------
# What --resume needs
# ---------------------------------------------------------------------------------------------


def test_resume_without_a_checkpoint_is_an_error_not_a_new_run(small_copy, tmp_path):
    import shutil

    missing = tmp_path / "missing"
    with pytest.raises(UserError, match=r"nothing to resume: .*does not exist; drop --resume"):
        train(COPY_CONFIG, small_copy, missing, EXACT + ["train.max_updates=2"], resume=True)
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match=r"nothing to resume: .*is empty; drop --resume"):
        train(COPY_CONFIG, small_copy, empty, EXACT + ["train.max_updates=2"], resume=True)
    assert not any(empty.iterdir())
    # A run that stopped before its first checkpoint: --force starts it again (without --resume, an
    # existing run directory is refused).
    run = tmp_path / "run"
    train(COPY_CONFIG, small_copy, run, EXACT + ["train.max_updates=2"])
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(UserError, match=r"nothing to resume: .*holds no checkpoint.*--force instead of --resume"):
        train(COPY_CONFIG, small_copy, run, EXACT + ["train.max_updates=2"], resume=True)
    assert train(COPY_CONFIG, small_copy, run, EXACT + ["train.max_updates=2"], force=True).step == 2


# ---------------------------------------------------------------------------------------------
# The report at the end
# ---------------------------------------------------------------------------------------------


def test_the_final_report_names_the_model_to_use_and_the_next_commands(small_copy, tmp_path, capsys):
    """copy.yaml averages nothing (average_last 0): the report points at last/, and never at an
    averaged/ that does not exist; with averaging, at averaged/. Its commands run as printed."""
    import shlex

    from aiayn.cli import main

    out = tmp_path / "run"
    args = ["train", "--config", str(COPY_CONFIG), "--data", str(small_copy), "--out", str(out), *TINY,
            "train.batch_tokens=300", "train.save_every=2", "train.valid_bleu_sentences=5"]
    assert main(args + ["train.max_updates=4"]) == 0
    printed = capsys.readouterr().out
    assert not (out / "averaged").exists() and "averaged" not in printed
    assert "stopped at update 4 (max_updates)" in printed
    assert f"aiayn translate --checkpoint {out / 'last'}" in printed
    evaluate = f"aiayn evaluate --checkpoint {out / 'last'} --src {small_copy / 'test.src'} --ref {small_copy / 'test.tgt'}"
    assert evaluate in printed
    assert main(shlex.split(evaluate)[1:]) == 0
    assert "BLEU" in capsys.readouterr().out

    result = train(COPY_CONFIG, small_copy, out, args[7:] + ["train.max_updates=6", "train.average_last=2"],
                   resume=True)
    assert result.model_dir == out / "averaged" and (out / "averaged").is_dir()
    assert f"aiayn translate --checkpoint {out / 'averaged'}" in result.next_steps()
    assert "the average of the last 2 checkpoints" in result.next_steps()


# ---------------------------------------------------------------------------------------------
# Precision (aiayn.precision): auto resolved per machine, checkpoints in fp32 either way
# ---------------------------------------------------------------------------------------------


def _start_record(out):
    return next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"start"' in line)


def test_auto_precision_is_resolved_recorded_and_checkpoints_are_fp32(small_copy, tmp_path, capsys):
    """train.precision defaults to auto: the start record and the start line say what it became on
    this machine; the weights written are fp32 whatever the arithmetic was."""
    from aiayn.checkpoint import load_checkpoint
    from aiayn.precision import resolve_precision

    overrides = [o for o in TINY if not o.startswith("train.precision")] + [
        "train.max_updates=3", "train.valid_every=0", "train.average_last=0", "train.batch_tokens=300"]
    result = train(COPY_CONFIG, small_copy, tmp_path / "run", overrides)
    expected = resolve_precision("auto", torch.device("cpu"))
    start = _start_record(tmp_path / "run")
    assert (start["precision"], start["precision_setting"]) == (expected, "auto")
    assert f"precision {expected} (auto; this CPU has" in capsys.readouterr().err
    tensors = load_file(str(result.last_checkpoint / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    model = load_checkpoint(result.last_checkpoint).model
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_forced_bf16_is_refused_where_the_cpu_would_emulate_it(small_copy, tmp_path, monkeypatch):
    from aiayn import precision

    monkeypatch.setattr(precision, "cpu_arithmetic", lambda: precision.CpuArithmetic("AVX2", False, False, False))
    with pytest.raises(UserError, match="train.precision bf16: this CPU .* has no native bf16"):
        train(COPY_CONFIG, small_copy, tmp_path / "run", TINY + ["train.precision=bf16", "train.max_updates=1"])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bf16_run_stopped_and_resumed_equals_one_bf16_run(small_copy, tmp_path):
    """Exact resume holds in bf16 too (where the CPU has it natively; elsewhere bf16 is refused)."""
    from aiayn.precision import native_bf16

    if not native_bf16(torch.device("cpu")):
        pytest.skip("this CPU has no native bf16")
    common = EXACT + ["train.precision=bf16", "train.valid_every=4"]
    train(COPY_CONFIG, small_copy, tmp_path / "reference", common + ["train.max_updates=8"])
    train(COPY_CONFIG, small_copy, tmp_path / "stopped", common + ["train.max_updates=5"])
    train(COPY_CONFIG, small_copy, tmp_path / "stopped", common + ["train.max_updates=8"], resume=True)
    assert _start_record(tmp_path / "reference")["precision"] == "bf16"
    assert_same_final_state(tmp_path / "stopped", tmp_path / "reference")


# -- fine-tuning: train --init and prepare --tokenizer-from --------------------------------------


def test_fine_tuning_starts_from_the_checkpoint(copy_checkpoint, tmp_path, capsys):
    """prepare --tokenizer-from encodes new data with the checkpoint's tokenizer; train --init
    starts from its weights and model config (dropout may change), with a fresh schedule."""
    from aiayn.checkpoint import load_checkpoint
    from aiayn.data import load_dataset

    src, tgt = tmp_path / "new.src", tmp_path / "new.tgt"
    rng = __import__("random").Random(0)
    lines = [[rng.choice("abcdefghijklmnopqrst") for _ in range(rng.randint(3, 12))] for _ in range(300)]
    src.write_text("".join(" ".join(w) + "\n" for w in lines))
    tgt.write_text("".join(" ".join(w[::-1]) + "\n" for w in lines))  # a new task: reversing
    data = tmp_path / "data"
    assert main(["prepare", "--src", str(src), "--tgt", str(tgt), "--tokenizer-from", str(copy_checkpoint),
                 "--out", str(data), "--valid-size", "20", "--test-size", "20"]) == 0
    base = load_checkpoint(copy_checkpoint)
    dataset = load_dataset(data)
    assert dataset.tokenizer.sha256 == base.tokenizer.sha256
    assert dataset.manifest["vocab"]["from_checkpoint"] == copy_checkpoint.resolve().name
    capsys.readouterr()
    assert main(["prepare", "--src", str(src), "--tgt", str(tgt), "--tokenizer-from", str(copy_checkpoint),
                 "--out", str(data), "--valid-size", "20", "--test-size", "20"]) == 0
    assert "reusing" in capsys.readouterr().out  # the same tokenizer: the same dataset

    out = tmp_path / "ft"
    # A learning rate of almost nothing: after one update the weights are still the checkpoint's.
    args = ["train", "--config", "finetune", "--init", str(copy_checkpoint), "--data", str(data), "--out", str(out),
            "train.max_updates=1", "train.max_minutes=0", "train.lr_factor=1e-12", "train.progress=false", FP32,
            "model.dropout=0.05"]
    assert main(args) == 0
    tuned = load_checkpoint(out / "last")
    assert tuned.model.config == dataclasses.replace(base.model.config, dropout=0.05)
    assert tuned.meta["initialised_from"] == copy_checkpoint.resolve().name
    theirs = base.model.state_dict()
    for name, value in tuned.model.state_dict().items():
        torch.testing.assert_close(value, theirs[name], atol=1e-6, rtol=0, msg=name)
    start = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert start["kind"] == "start" and start["initialised_from"] == copy_checkpoint.resolve().name


def test_fine_tuning_refuses_another_tokenizer_or_architecture(copy_checkpoint, copy_dataset, small_copy, tmp_path,
                                                               capsys):
    other = tmp_path / "other"
    assert main(["prepare", "--corpus", "reverse", "--out", str(other), "--train-size", "300",
                 "--valid-size", "20", "--test-size", "20", "--vocab-size", "30"]) == 0  # another vocabulary
    capsys.readouterr()
    base = ["train", "--config", "finetune", "--init", str(copy_checkpoint), "--out", str(tmp_path / "ft")]
    assert main([*base, "--data", str(other), FP32, "train.max_updates=1"]) == 2
    err = capsys.readouterr().err
    assert "not encoded with this checkpoint's tokenizer" in err and "--tokenizer-from" in err
    assert main([*base, "--data", str(copy_dataset), FP32, "train.max_updates=1", "model.d_model=48"]) == 2
    err = capsys.readouterr().err.strip()
    assert "override 'model.d_model=48': model.d_model is 48 but the checkpoint's is 64" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "ft").exists()
    assert main(["prepare", "--corpus", "copy", "--out", str(tmp_path / "x"), "--tokenizer-from",
                 str(tmp_path / "missing")]) == 2
    assert "no such checkpoint directory (--tokenizer-from)" in capsys.readouterr().err
