"""Checkpoint averaging (§6.1, aiayn.train.average)."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from aiayn.train import average_checkpoints
from aiayn.train.state import list_checkpoints


def test_averaging_identical_checkpoints_gives_the_same_weights(copy_run, tmp_path):
    from aiayn.cli import main

    last = list_checkpoints(copy_run.out_dir)[-1]
    out = average_checkpoints([last, last, last], tmp_path / "avg")
    a, b = load_file(str(last / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Two different checkpoints: the element-wise mean, via the CLI and --last.
    assert main(["average", "--out", str(tmp_path / "avg2"), str(copy_run.out_dir), "--last", "2"]) == 0
    c0, c1 = (load_file(str(p / "model.safetensors")) for p in list_checkpoints(copy_run.out_dir)[-2:])
    avg = load_file(str(tmp_path / "avg2/model.safetensors"))
    for k in avg:
        torch.testing.assert_close(avg[k], (c0[k] + c1[k]) / 2, rtol=0, atol=1e-6)
    assert main(["average", "--out", str(tmp_path / "avg3"), str(copy_run.out_dir), "--last", "9"]) == 2
