"""DistributedDataParallel (aiayn.train.distributed, the step's normalisation under DDP): two gloo
processes equal one process with both batches; the real entry point under torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from aiayn.allocator import find as find_allocator
from aiayn.data import collate
from aiayn.train.distributed import DistContext
from aiayn.train.state import list_checkpoints
from aiayn.train.step import Criterion, StepContext, train_update

from helpers import MKL, REPO, TINY, adam, tiny_model, train_pairs


def _ddp_worker(rank: int, world: int, port: int, dataset: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        src, tgt = train_pairs(Path(dataset), list(range(10)))
        shards = [collate(src[:3], tgt[:3]), collate(src[3:], tgt[3:])]  # unequal token counts
        model = tiny_model()
        ddp = DistributedDataParallel(Criterion(model, 0.1))  # what the trainer wraps
        opt = adam(model)
        ctx = StepContext(label_smoothing=0.1, dist=DistContext(rank=rank, world_size=world))
        res = train_update(ddp, opt, [shards[rank]], 1e-3, ctx)
        if rank == 0:
            tensors = {k: v.grad.detach().clone().contiguous() for k, v in model.named_parameters()}
            tensors["_loss"] = torch.tensor([res.loss, float(res.n_tokens)], dtype=torch.float64)
            save_file(tensors, out)
        dist.barrier()  # both ranks tear down together (CI once saw gloo abort a rank at exit)
    finally:
        dist.destroy_process_group()
    # As `aiayn train` ends a torchrun worker (aiayn.commands.train._exit_worker): without C++
    # static destructors, where gloo could abort the finished process.
    sys.stdout.flush()
    os._exit(0)


def test_ddp_update_on_two_ranks_equals_one_rank_with_both_batches(copy_dataset, tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp.safetensors")
    mp.start_processes(_ddp_worker, args=(2, port, str(copy_dataset), out), nprocs=2, start_method="spawn")
    ddp = load_file(out)

    src, tgt = train_pairs(copy_dataset, list(range(10)))
    model = tiny_model()
    opt = adam(model)
    res = train_update(model, opt, [collate(src[:3], tgt[:3]), collate(src[3:], tgt[3:])], 1e-3,
                       StepContext(label_smoothing=0.1))
    assert ddp["_loss"][1].item() == res.n_tokens
    assert ddp["_loss"][0].item() == pytest.approx(res.loss, rel=1e-6)
    for name, p in model.named_parameters():  # gradients: see the accumulation test
        torch.testing.assert_close(ddp[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_torchrun_two_cpu_processes_train_and_resume(copy_dataset, tmp_path):
    """The real entry point under torchrun (gloo): rank 0 alone writes; --resume continues."""
    out = tmp_path / "run"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "aiayn", "train", "--config", str(REPO / "configs/copy.yaml"), "--data", str(copy_dataset),
            "--out", str(out)]
    # fp32_products auto: rank 0 measures MKL against oneDNN, every rank follows it, and the
    # resumed run keeps the first session's choice
    opts = [*(o for o in TINY if o != MKL), "train.fp32_products=auto", "train.save_every=2", "train.valid_every=3",
            "train.valid_bleu_sentences=5", "train.average_last=2", "train.batch_tokens=400"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(base + opts + ["train.max_updates=4"], capture_output=True, text=True, env=env, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("stopped at update 4") == 1  # one report, from rank 0
    second = subprocess.run(base + ["--resume"] + opts + ["train.max_updates=6"], capture_output=True, text=True, env=env,
                            timeout=240)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming" in second.stderr and "(update 4)" in second.stderr
    assert [p.name for p in list_checkpoints(out)] == ["step_0000002", "step_0000004", "step_0000006"]
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["kind"] == "valid"] == [3, 4, 6]  # 4: the first run's final one
    assert [r["world_size"] for r in log if r["kind"] == "start"] == [2, 2]
    chosen = [r["fp32_products"] for r in log if r["kind"] == "start"]
    assert chosen[0] in ("mkl", "onednn") and chosen[1] == chosen[0]
    # Each worker re-executed itself under the fast allocator when one is installed.
    fast = find_allocator()
    assert [r["allocator"] for r in log if r["kind"] == "start"] == [fast.name if fast else "system"] * 2
    assert (out / "averaged" / "model.safetensors").is_file()
