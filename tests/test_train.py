"""Tests of the training stage: the recipe's formulas, gradient accumulation, DDP, exact
resume after SIGKILL, averaging, logs and the configs. Models are tiny; data is synthetic."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from aiayn.allocator import find as find_allocator
from aiayn.data import collate, load_dataset
from aiayn.errors import UserError
from aiayn.model import Transformer, TransformerConfig
from aiayn.train import TrainConfig, average_checkpoints, inverse_sqrt_lr, label_smoothed_loss, resolve_config, train
from aiayn.train.config import load_raw_config
from aiayn.train.distributed import DistContext
from aiayn.train.state import list_checkpoints
from aiayn.train.step import Criterion, StepContext, train_update

from helpers import TINY

REPO = Path(__file__).resolve().parents[1]


def tiny_model(vocab: int = 45, dropout: float = 0.0, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(src_vocab_size=vocab, d_model=32, d_ff=64, n_heads=2, n_encoder_layers=1,
                                         n_decoder_layers=1, dropout=dropout))


def adam(model: torch.nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=0.0, betas=(0.9, 0.98), eps=1e-9)


def pairs(dataset: Path, indices: list[int]):
    train_split = load_dataset(dataset).split("train")
    return [train_split.src[i] for i in indices], [train_split.tgt[i] for i in indices]


# ---------------------------------------------------------------------------------------------
# The recipe's formulas
# ---------------------------------------------------------------------------------------------


def test_schedule_values_at_known_steps():
    # lr = d_model^-0.5 · min(step^-0.5, step · warmup^-1.5), d_model 512, warmup 4000 (§5.3)
    assert inverse_sqrt_lr(1, 512, 4000) == pytest.approx(512**-0.5 * 4000**-1.5, rel=1e-12)
    assert inverse_sqrt_lr(1, 512, 4000) == pytest.approx(1.746928e-07, rel=1e-6)
    assert inverse_sqrt_lr(4000, 512, 4000) == pytest.approx(6.987712e-04, rel=1e-6)  # the peak
    assert inverse_sqrt_lr(16000, 512, 4000) == pytest.approx(6.987712e-04 / 2, rel=1e-6)  # 1/sqrt decay
    assert inverse_sqrt_lr(2000, 512, 4000) == pytest.approx(6.987712e-04 / 2, rel=1e-6)  # linear warmup
    assert inverse_sqrt_lr(100, 256, 50, factor=2.0) == pytest.approx(2 * 256**-0.5 * 100**-0.5)
    peak = max(range(1, 10001), key=lambda s: inverse_sqrt_lr(s, 512, 4000))
    assert peak == 4000
    with pytest.raises(ValueError):
        inverse_sqrt_lr(0, 512, 4000)


def test_label_smoothed_loss_equals_hand_computation():
    torch.manual_seed(0)
    vocab, eps, pad = 7, 0.1, 0
    logits = torch.randn(2, 3, vocab)
    target = torch.tensor([[4, 5, 3], [6, 3, pad]])  # the last position is padding: ignored
    sums = label_smoothed_loss(logits, target, eps, pad)
    logp = torch.log_softmax(logits.double(), -1)
    expected_loss = expected_nll = 0.0
    for b in range(2):
        for t in range(3):
            y = int(target[b, t])
            if y == pad:
                continue
            q = [eps / (vocab - 2)] * vocab  # ε spread over the classes other than y and pad
            q[y], q[pad] = 1 - eps, 0.0
            assert sum(q) == pytest.approx(1.0)
            expected_loss += -sum(q[k] * float(logp[b, t, k]) for k in range(vocab))
            expected_nll += -float(logp[b, t, y])
    assert sums.n_tokens == 5
    assert float(sums.loss) == pytest.approx(expected_loss, rel=1e-6)
    assert float(sums.nll) == pytest.approx(expected_nll, rel=1e-6)
    # ε = 0 is plain cross-entropy with padding ignored.
    plain = label_smoothed_loss(logits, target, 0.0, pad)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), ignore_index=pad,
                                           reduction="sum")
    assert float(plain.loss) == pytest.approx(float(ce), rel=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.0])
def test_fused_projection_and_loss_equal_the_reference(eps, monkeypatch):
    """smoothed_cross_entropy (chunked, logits never materialised, gradients computed in the
    forward pass) == projecting, then the textbook log-softmax loss, then autograd."""
    import aiayn.train.loss as loss_mod

    monkeypatch.setattr(loss_mod, "MIN_ROWS", 16)  # several chunks, the last one partial
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 16 * 50)
    torch.manual_seed(0)
    n, d, vocab, pad = 75, 8, 50, 0
    hidden, weight = torch.randn(n, d), torch.randn(vocab, d)
    target = torch.randint(1, vocab, (n,))
    target[:5] = 7  # a repeated class
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    fused = loss_mod.smoothed_cross_entropy(h1, w1, target, eps, pad)
    (fused.loss * 0.25).backward()  # the incoming gradient scales the stored ones
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = label_smoothed_loss(h2 @ w2.t(), target, eps, pad)
    (ref.loss * 0.25).backward()
    assert fused.n_tokens == ref.n_tokens == n
    # Both compute in fp32 (the loss never runs in lower precision): fp32 round-off apart.
    assert float(fused.loss.detach()) == pytest.approx(float(ref.loss.detach()), rel=1e-6)
    assert float(fused.nll) == pytest.approx(float(ref.nll), rel=1e-6)
    assert int(fused.n_correct) == int(ref.n_correct)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)
    # Without gradients (validation) the same sums, and nothing saved for a backward pass.
    with torch.no_grad():
        assert float(loss_mod.smoothed_cross_entropy(h1, w1, target, eps, pad).loss) == pytest.approx(float(ref.loss), rel=1e-6)


def test_update_projects_only_real_target_positions(copy_dataset):
    """The batch's target index picks exactly the non-pad positions, and the update's loss
    equals the reference loss over the full, padded logits."""
    src, tgt = pairs(copy_dataset, list(range(6)))
    batch = collate(src, tgt)
    assert torch.equal(batch.tgt_index, batch.tgt_out.reshape(-1).ne(0).nonzero().squeeze(1))
    assert torch.equal(batch.tgt_labels, batch.tgt_out.reshape(-1)[batch.tgt_index])
    assert batch.tgt_out.eq(0).any()  # there is padding to leave out
    model = tiny_model()
    with torch.no_grad():
        ref = label_smoothed_loss(model.eval()(batch.src, batch.tgt_in), batch.tgt_out, 0.1, 0)
        loss, nll, correct = Criterion(model, 0.1)(batch)
    assert float(loss) == pytest.approx(float(ref.loss), rel=1e-5)
    assert float(nll) == pytest.approx(float(ref.nll), rel=1e-5)
    assert int(correct) == int(ref.n_correct)


def test_accumulating_micro_batches_equals_one_big_batch(copy_dataset):
    src, tgt = pairs(copy_dataset, list(range(12)))
    ctx = StepContext(label_smoothing=0.1, pad_id=0)
    # 3 micro-batches of different sizes, accumulated ...
    m1 = tiny_model()
    o1 = adam(m1)
    micro = [collate(src[:2], tgt[:2]), collate(src[2:7], tgt[2:7]), collate(src[7:], tgt[7:])]
    r1 = train_update(m1, o1, micro, 1e-3, ctx)
    # ... equal one batch holding all of them.
    m2 = tiny_model()
    o2 = adam(m2)
    r2 = train_update(m2, o2, [collate(src, tgt)], 1e-3, ctx)
    assert r1.n_tokens == r2.n_tokens
    assert r1.loss == pytest.approx(r2.loss, rel=1e-5)
    assert r1.grad_norm == pytest.approx(r2.grad_norm, rel=1e-4)
    # Gradients (kept after the step) agree to fp32 round-off. The weights after Adam are not
    # compared: gradients that are zero in exact arithmetic (the key biases: softmax ignores a
    # constant added to all scores) are ~1e-10 noise, which Adam's m/√v scales up to full steps.
    for (name, a), b in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert not torch.equal(next(m1.parameters()), next(tiny_model().parameters()))  # it did update


def poison_decoder(model, value: float):
    """Make the decoder's output non-finite (a forward hook; call .remove() on the result)."""
    return model.decoder.register_forward_hook(lambda mod, inp, out: (out[0] * value, *out[1:]))


def test_nonfinite_loss_skips_the_update_and_leaves_weights_alone(copy_dataset):
    src, tgt = pairs(copy_dataset, list(range(4)))
    model = tiny_model()
    opt = adam(model)
    ctx = StepContext(label_smoothing=0.1, pad_id=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hook = poison_decoder(model, float("nan"))
    res = train_update(model, opt, [collate(src, tgt)], 1e-3, ctx)
    hook.remove()
    assert res.skipped and not math.isfinite(res.loss)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not opt.state  # Adam never stepped
    assert not train_update(model, opt, [collate(src, tgt)], 1e-3, ctx).skipped


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


# ---------------------------------------------------------------------------------------------
# The copy task, the run directory, logs
# ---------------------------------------------------------------------------------------------


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


def test_plot_writes_a_png(copy_run, tmp_path):
    from aiayn.cli import main

    png = tmp_path / "curves.png"
    assert main(["plot", str(copy_run.out_dir), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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


# ---------------------------------------------------------------------------------------------
# Exact resume after SIGKILL
# ---------------------------------------------------------------------------------------------


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
    overrides = TINY + ["model.dropout=0.1", "train.max_updates=120", "train.save_every=20", "train.valid_every=40",
                        "train.valid_bleu_sentences=10", "train.batch_tokens=400", "train.log_every=10",
                        "train.keep_last=10", "train.average_last=0"]
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


# ---------------------------------------------------------------------------------------------
# DistributedDataParallel: 2 gloo processes == 1 process with both batches
# ---------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, dataset: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        src, tgt = pairs(Path(dataset), list(range(10)))
        shards = [collate(src[:3], tgt[:3]), collate(src[3:], tgt[3:])]  # unequal token counts
        model = tiny_model()
        ddp = DistributedDataParallel(Criterion(model, 0.1))  # what the trainer wraps
        opt = adam(model)
        ctx = StepContext(label_smoothing=0.1, pad_id=0, dist=DistContext(rank=rank, world_size=world))
        res = train_update(ddp, opt, [shards[rank]], 1e-3, ctx)
        if rank == 0:
            tensors = {k: v.grad.detach().clone().contiguous() for k, v in model.named_parameters()}
            tensors["_loss"] = torch.tensor([res.loss, float(res.n_tokens)], dtype=torch.float64)
            save_file(tensors, out)
    finally:
        dist.destroy_process_group()


def test_ddp_update_on_two_ranks_equals_one_rank_with_both_batches(copy_dataset, tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp.safetensors")
    mp.start_processes(_ddp_worker, args=(2, port, str(copy_dataset), out), nprocs=2, start_method="spawn")
    ddp = load_file(out)

    src, tgt = pairs(copy_dataset, list(range(10)))
    model = tiny_model()
    opt = adam(model)
    res = train_update(model, opt, [collate(src[:3], tgt[:3]), collate(src[3:], tgt[3:])], 1e-3,
                       StepContext(label_smoothing=0.1, pad_id=0))
    assert ddp["_loss"][1].item() == res.n_tokens
    assert ddp["_loss"][0].item() == pytest.approx(res.loss, rel=1e-6)
    for name, p in model.named_parameters():  # gradients: see the accumulation test
        torch.testing.assert_close(ddp[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------------
# Averaging, configs
# ---------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_resolves(path):
    cfg = resolve_config(load_raw_config(path, []), vocab_size=8000, where=str(path))
    assert cfg.model.src_vocab_size == cfg.model.tgt_vocab_size == 8000
    assert cfg.train.keep_last >= cfg.train.average_last


def test_config_overrides_and_errors(tmp_path):
    raw = load_raw_config(REPO / "configs/copy.yaml", ["model.d_model=128", "train.max_updates=7", "train.adam_eps=1e-8"])
    cfg = resolve_config(raw, vocab_size=45)
    assert cfg.model.d_model == 128 and cfg.train.max_updates == 7 and cfg.train.adam_eps == 1e-8
    with pytest.raises(UserError, match="unknown key"):
        resolve_config(load_raw_config(REPO / "configs/copy.yaml", ["train.max_update=7"]), vocab_size=45)
    with pytest.raises(UserError, match="vocabulary"):
        resolve_config(load_raw_config(REPO / "configs/copy.yaml", ["model.src_vocab_size=99"]), vocab_size=45)
    with pytest.raises(UserError, match="precision"):
        resolve_config(load_raw_config(REPO / "configs/copy.yaml", ["train.precision=fp8"]), vocab_size=45)
    assert TrainConfig().warmup == 4000 and TrainConfig().label_smoothing == 0.1
    base = resolve_config(load_raw_config(REPO / "configs/base.yaml", []), vocab_size=37000)
    assert (base.model.d_model, base.model.n_heads, base.model.dropout) == (512, 8, 0.1)
    assert (base.train.batch_tokens, base.train.max_updates, base.train.average_last) == (25000, 100000, 5)
    big = resolve_config(load_raw_config(REPO / "configs/big.yaml", []), vocab_size=37000)
    assert (big.model.d_model, big.model.dropout, big.train.max_updates, big.train.average_last) == (1024, 0.3, 300000, 20)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_update_is_finite(copy_dataset, precision):
    src, tgt = pairs(copy_dataset, list(range(4)))
    model = tiny_model()
    opt = adam(model)
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    ctx = StepContext(label_smoothing=0.1, pad_id=0, precision=precision, scaler=scaler)
    before = next(model.parameters()).clone()
    results = [train_update(model, opt, [collate(src, tgt)], 1e-3, ctx) for _ in range(3)]
    assert all(math.isfinite(r.loss) for r in results)
    assert any(not r.skipped for r in results)
    assert not torch.equal(before, next(model.parameters()))
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32


def test_torchrun_two_cpu_processes_train_and_resume(copy_dataset, tmp_path):
    """The real entry point under torchrun (gloo): rank 0 alone writes; --resume continues."""
    out = tmp_path / "run"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "aiayn", "train", "--config", str(REPO / "configs/copy.yaml"), "--data", str(copy_dataset),
            "--out", str(out)]
    opts = [*TINY, "train.save_every=2", "train.valid_every=3", "train.valid_bleu_sentences=5",
            "train.average_last=2", "train.batch_tokens=400"]
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
    # Each worker re-executed itself under the fast allocator when one is installed.
    fast = find_allocator()
    assert [r["allocator"] for r in log if r["kind"] == "start"] == [fast.name if fast else "system"] * 2
    assert (out / "averaged" / "model.safetensors").is_file()


def test_resume_refuses_a_different_model(copy_run, copy_dataset, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(copy_run.out_dir, out, symlinks=True)
    with pytest.raises(UserError, match="model config differs.*d_model"):
        train(REPO / "configs/copy.yaml", copy_dataset, out, ["model.d_model=32", "train.progress=false"], resume=True)


# ---------------------------------------------------------------------------------------------
# Learned positions and long sentences
# ---------------------------------------------------------------------------------------------


def test_validation_truncates_long_sentences_for_learned_positions(copy_dataset):
    """Copy-task sentences have up to 20 subwords; 12 learned positions hold 11 plus EOS/BOS.
    Validation truncates them as Translator does instead of indexing past the table."""
    from aiayn.train.validation import greedy_translate, validate

    valid = load_dataset(copy_dataset).split("valid")
    assert valid.src_lens.max() > 11
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(src_vocab_size=45, d_model=32, d_ff=64, n_heads=2, n_encoder_layers=1,
                                          n_decoder_layers=1, positions="learned", max_positions=12))
    result = validate(model, load_dataset(copy_dataset), label_smoothing=0.1, batch_tokens=2000, bleu_sentences=20)
    assert math.isfinite(result.loss) and result.bleu is not None and result.n_sentences == 20
    batch = valid.collate(range(len(valid)), 11)
    assert batch.src.size(1) == batch.tgt_in.size(1) == 12 and batch.src[:, -1].eq(3).any()
    hyps = greedy_translate(model, load_dataset(copy_dataset), "valid", 20, 2000, 1.0, 50, "fp32", torch.device("cpu"))
    assert len(hyps) == 20


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
    with pytest.raises(UserError, match=r"this dataset: its spm.model is not the run's \(checkpoint step_0000002\)"):
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


def test_progress_bar_counts_the_time_budget(copy_dataset, tmp_path, monkeypatch):
    """Under train.max_minutes the bar's total is the budget in seconds and it advances with the
    elapsed time (updates in the postfix); without a budget it counts updates to max_updates."""
    import tqdm

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
    import aiayn.train.trainer as trainer_module

    clock = [0.0]

    class FakeTime:
        @staticmethod
        def perf_counter() -> float:
            return clock[0]

    def one_second_update(*args, **kwargs):
        clock[0] += 1.0
        return train_update(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "time", FakeTime)
    monkeypatch.setattr(trainer_module, "train_update", one_second_update)
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
