"""Loading a checkpoint (aiayn.checkpoint): what a user gives instead of one, and a damaged one,
are one-line errors that name the file and say what to give."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from aiayn.checkpoint import load_checkpoint
from aiayn.cli import main
from aiayn.errors import UserError


def error_of(path) -> str:
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    return str(info.value)


@pytest.fixture
def checkpoint(random_checkpoint, tmp_path):
    """A copy of the tests' random checkpoint, to damage."""
    return shutil.copytree(random_checkpoint, tmp_path / "ckpt")


@pytest.mark.parametrize("keep", [0, 7, 100, -100])
def test_a_truncated_weights_file_is_named_as_truncated(checkpoint, keep):
    weights = checkpoint / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, keep if keep >= 0 else size + keep)
    message = error_of(checkpoint)
    assert message.startswith(f"{weights}: the weights file is truncated or corrupt (")
    assert "copy or write the checkpoint again" in message


def test_weights_of_another_model_are_named_as_not_matching(checkpoint, random_checkpoint):
    config = checkpoint / "config.yaml"
    config.write_text(config.read_text(encoding="utf-8").replace("d_ff: 64", "d_ff: 32"), encoding="utf-8")
    assert error_of(checkpoint).startswith(f"{checkpoint / 'model.safetensors'}: weights do not match config.yaml (")


def test_a_mistyped_config_names_its_line(checkpoint):
    config = checkpoint / "config.yaml"
    lines = config.read_text(encoding="utf-8").splitlines()
    n = next(i for i, line in enumerate(lines) if line.strip().startswith("d_ff:"))
    lines[n] = "  d_ff: wide"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert error_of(checkpoint) == f"{config}:{n + 1}: model.d_ff: expected an integer, got 'wide'"


def make_run(root, checkpoint, *names):
    """A training run's directory layout (aiayn.train.trainer) with ``names`` among averaged/best/last."""
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n", encoding="utf-8")
    (run / "metrics.jsonl").write_text("", encoding="utf-8")
    shutil.copytree(checkpoint, run / "checkpoints" / "step_0000001")
    for name in names:
        if name == "last":
            os.symlink("checkpoints/step_0000001", run / "last")
        else:
            shutil.copytree(checkpoint, run / name)
    return run


def test_a_run_directory_names_its_checkpoints(checkpoint, tmp_path):
    run = make_run(tmp_path, checkpoint, "last")  # a run of configs/copy.yaml: no averaged/
    assert error_of(run) == (f"{run}: is an aiayn training run, not a checkpoint; give one of its checkpoints: "
                             f"{run / 'last'}")
    shutil.copytree(checkpoint, run / "averaged")
    assert error_of(run).endswith(f"give one of its checkpoints: {run / 'averaged'} or {run / 'last'}")
    load_checkpoint(run / "averaged")


def test_a_missing_checkpoint_of_a_run_names_those_it_has(checkpoint, tmp_path):
    run = make_run(tmp_path, checkpoint, "last")
    assert error_of(run / "averaged") == (f"{run / 'averaged'}: no such checkpoint directory; the run {run} has "
                                          f"{run / 'last'}")
    assert error_of(tmp_path / "elsewhere") == f"{tmp_path / 'elsewhere'}: no such checkpoint directory"


def test_a_dataset_directory_is_named_as_a_dataset(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"format": "aiayn-dataset", "version": 1}), encoding="utf-8")
    assert error_of(data).startswith(f"{data}: is an aiayn dataset, not a checkpoint; a checkpoint is what aiayn "
                                     "train writes (RUN/averaged, or RUN/last)")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_translate_with_a_run_directory_is_one_line(checkpoint, tmp_path, capsys, workers):
    run = make_run(tmp_path, checkpoint, "last")
    (tmp_path / "in.txt").write_text("a dog\n", encoding="utf-8")
    assert main(["translate", "--checkpoint", str(run), "--input", str(tmp_path / "in.txt"),
                 "--workers", workers]) == 2
    assert capsys.readouterr().err == (f"aiayn: error: {run}: is an aiayn training run, not a checkpoint; give one "
                                       f"of its checkpoints: {run / 'last'}\n")
