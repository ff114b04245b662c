"""Demo-size training: today's code against the code before the speed work, same run, same data.

The training-speed issue asked for twice the target tokens/s at the demo's size, measured
against the code as it was (git commit `BASELINE_COMMIT`, the last one before that work). That
commit's `src/aiayn` is unpacked with ``git archive`` into a temporary directory as the package
``aiayn_baseline`` and imported next to the current ``aiayn``.

Each system runs in a worker process of its own (`python demo_training.py --worker ...`), so
the allocator can differ between them (it must be chosen before a process starts):

    before   (commit BASELINE_COMMIT, glibc malloc)   what users ran
    before   (commit BASELINE_COMMIT, fast allocator) the allocator alone
    now      (glibc malloc)                            the code alone
    now      (fast allocator)                          what users run now in fp32
    now      (fast allocator, fp32 through oneDNN)    fp32 with every product through oneDNN, as
                                                       `train.fp32_products` onednn runs it (what
                                                       its auto picks where MKL is the slower)
    now      (fast allocator, bf16)                    where the CPU has native bf16: what users run
                                                       there (precision auto: autocast, explicit
                                                       attention, as the trainer does)

The workers take turns: in every round each runs K updates while the others wait, on the same
real batches (the demo's LibreOffice data, the demo's config: model, batch size, clipping, lr
schedule), all torch threads. Each figure is the median over rounds of target tokens / wall
second of a worker's K updates; ratios are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BASELINE_COMMIT = "b6a27a9"  # main before the training-speed work (issue: training at the machine's limit)
SYSTEMS = [("before", "system", "fp32"), ("before", "fast", "fp32"), ("now", "system", "fp32"), ("now", "fast", "fp32"),
           ("now", "fast", "fp32-onednn"), ("now", "fast", "bf16")]
ONEDNN_SUFFIX = ", fp32 through oneDNN"


def label(code: str, alloc: str, fast_name: str, precision: str = "fp32") -> str:
    name = f"{'commit ' + BASELINE_COMMIT if code == 'before' else 'now'}, {fast_name if alloc == 'fast' else 'glibc malloc'}"
    return name + {"bf16": ", bf16", "fp32-onednn": ONEDNN_SUFFIX}.get(precision, "")


def unpack_baseline(directory: Path) -> Path:
    """``git archive BASELINE_COMMIT src/aiayn`` -> DIRECTORY/aiayn_baseline (a package)."""
    blob = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", BASELINE_COMMIT, "src/aiayn"],
                          capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(directory, filter="data")
    target = directory / "aiayn_baseline"
    (directory / "src" / "aiayn").rename(target)
    return directory


# ---------------------------------------------------------------------------------------------
# The worker: one system, K updates per request
# ---------------------------------------------------------------------------------------------


def worker(code: str, data_dir: str, config: str, batches: int, seed: int, precision: str = "fp32") -> None:
    import torch

    library = "onednn" if precision == "fp32-onednn" else "mkl"
    precision = precision.removesuffix("-onednn")

    if code == "before":
        from aiayn_baseline.data.batching import collate
        from aiayn_baseline.model import Transformer, TransformerConfig
        from aiayn_baseline.train.step import StepContext, train_update
    else:
        from aiayn.data.batching import collate
        from aiayn.model import Transformer, TransformerConfig
        from aiayn.train.step import Criterion, StepContext, train_update
    from aiayn.data import TokenBatchSampler, load_dataset
    from aiayn.train.config import load_raw_config, resolve_config
    from aiayn.train.schedule import inverse_sqrt_lr

    data = load_dataset(data_dir)
    cfg = resolve_config(load_raw_config(config, []), data.tokenizer.vocab_size)
    tc = cfg.train
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    train = data.split("train")
    sampler = TokenBatchSampler(train.src_lens, train.tgt_lens, tc.batch_tokens, shuffle=True, seed=seed)
    plan = [i for i, _ in zip(sampler, range(batches))]
    batch_list = [collate([train.src[j] for j in i], [train.tgt[j] for j in i]) for i in plan]
    torch.manual_seed(seed)
    model = Transformer(TransformerConfig(**_known_fields(TransformerConfig, cfg.model.to_dict())))
    if code != "before":
        from aiayn.train.dropout import use_fast_dropout

        use_fast_dropout(model)  # as the trainer builds it
        from aiayn.precision import for_training

        for_training(model, precision, torch.device("cpu"))
        from aiayn.train.products import mkl_linear, onednn_mm_linear, use_linear_library

        use_linear_library(model, library)  # as the trainer does with that library chosen
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps)
    # The baseline's StepContext still has pad_id (unused there too); today's has none.
    extra = {"pad_id": cfg.model.pad_id} if code == "before" else {"precision": precision}
    ctx = StepContext(label_smoothing=tc.label_smoothing, clip_norm=tc.clip_norm, **extra)
    unit = model if code == "before" else Criterion(model, tc.label_smoothing,
                                                    onednn_mm_linear if library == "onednn" else mkl_linear)
    step = 0

    def run(k: int) -> dict:
        nonlocal step
        tokens = 0
        start = time.perf_counter()
        for _ in range(k):
            batch = batch_list[step % len(batch_list)]
            step += 1
            res = train_update(unit, optimizer, [batch], inverse_sqrt_lr(step, cfg.model.d_model, tc.warmup, tc.lr_factor), ctx)
            tokens += res.n_tokens
        return {"tokens": tokens, "seconds": time.perf_counter() - start, "loss": res.loss}

    from aiayn.allocator import active

    print(json.dumps({"ready": True, "allocator": active(), "threads": torch.get_num_threads(),
                      "parameters": model.num_parameters()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("stop"):
            break
        print(json.dumps(run(int(request["updates"]))), flush=True)


def _known_fields(config_class, values: dict) -> dict:
    """``values`` without the options ``config_class`` (the baseline's older config) lacks, each of
    which must be at today's default: options added since then that the recipe does not use."""
    import dataclasses

    from aiayn.model import TransformerConfig as Today

    known = {f.name for f in dataclasses.fields(config_class)}
    defaults = {f.name: f.default for f in dataclasses.fields(Today)}
    for name in values.keys() - known:
        if values[name] != defaults.get(name, dataclasses.MISSING):
            raise ValueError(f"the baseline cannot run model.{name}={values[name]!r} (added after it)")
    return {k: v for k, v in values.items() if k in known}


# ---------------------------------------------------------------------------------------------
# The coordinator
# ---------------------------------------------------------------------------------------------


@dataclass
class DemoTrainingResult:
    config: str
    data: str
    updates_per_turn: int
    rounds: int
    fast_allocator: str
    systems: dict[str, dict] = field(default_factory=dict)  # label -> worker info
    tokens_per_s: dict[str, list[float]] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)
    error: str = ""


def run_demo_training(data_dir: Path, config: Path, rounds: int, updates: int, log) -> DemoTrainingResult:
    from aiayn.allocator import find

    fast = find("auto")
    result = DemoTrainingResult(str(config.relative_to(REPO)), str(data_dir), updates, rounds,
                                fast.name if fast else "none found")
    with tempfile.TemporaryDirectory(prefix="aiayn-baseline-") as tmp:
        try:
            unpack_baseline(Path(tmp))
        except (OSError, subprocess.CalledProcessError) as e:
            result.error = f"could not unpack commit {BASELINE_COMMIT} with git ({e}); section skipped"
            return result
        procs = {}
        from aiayn.train.products import onednn_fp32_available

        from common import bf16_supported

        for code, alloc, precision in SYSTEMS:
            if ((alloc == "fast" and fast is None) or (precision == "bf16" and not bf16_supported())
                    or (precision == "fp32-onednn" and not onednn_fp32_available())):
                continue
            env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "AIAYN_ALLOCATOR_REEXEC")}
            env["PYTHONPATH"] = os.pathsep.join([tmp, str(REPO / "src"), env.get("PYTHONPATH", "")])
            if alloc == "fast":
                from aiayn.allocator import preload_env

                env = preload_env(fast, env)
            name = label(code, alloc, result.fast_allocator, precision)
            procs[name] = subprocess.Popen(
                [sys.executable, str(HERE / "demo_training.py"), "--worker", code, "--data", str(data_dir),
                 "--config", str(config), "--batches", str(updates * (rounds + 1)), "--precision", precision],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        try:
            for name, proc in procs.items():
                result.systems[name] = json.loads(proc.stdout.readline())
                result.tokens_per_s[name] = []
                _ask(proc, updates)  # warm-up turn, not timed
            for r in range(rounds):
                order = list(procs)[r % len(procs):] + list(procs)[: r % len(procs)]
                for name in order:
                    reply = _ask(procs[name], updates)
                    result.tokens_per_s[name].append(reply["tokens"] / reply["seconds"])
                    result.loss[name] = reply["loss"]
                log("demo-size training round {}/{}: {}".format(
                    r + 1, rounds, ", ".join(f"{n} {v[-1]:.0f}" for n, v in result.tokens_per_s.items())))
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.stdin.write(json.dumps({"stop": True}) + "\n")
                    proc.stdin.close()
                    proc.wait(timeout=60)
    return result


def _ask(proc: subprocess.Popen, updates: int) -> dict:
    proc.stdin.write(json.dumps({"updates": updates}) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"a training worker died (exit status {proc.wait()})")
    return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=["before", "now"], required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "fp32-onednn", "bf16"], default="fp32")
    args = parser.parse_args()
    worker(args.worker, args.data, args.config, args.batches, args.seed, args.precision)


if __name__ == "__main__":
    main()
