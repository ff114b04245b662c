"""The training run: the paper's recipe (§5) from a dataset directory to checkpoints.

Run directory (others rely on it)::

    OUT/config.yaml                 the resolved config (model + train); usable as --config
    OUT/metrics.jsonl               one JSON object per line: train / valid / end records
    OUT/tb/                         TensorBoard events
    OUT/checkpoints/step_NNNNNNN/   the last ``keep_last`` checkpoints, each a full checkpoint
                                    (aiayn.checkpoint) plus the resume state (train/state.py)
    OUT/last -> checkpoints/...     the newest checkpoint (symlink; OUT/last.txt names it too)
    OUT/best/                       the checkpoint with the best valid BLEU so far
    OUT/averaged/                   the average of the last ``average_last`` checkpoints

Exact resume. Everything a run's future depends on is in its newest checkpoint: weights,
Adam moments, the update count (which fixes the learning rate), the RNG states of every rank
(dropout), the data position (epoch and batches consumed), the grad scaler, and the
early-stopping bookkeeping. A run killed at any moment and resumed with ``--resume`` repeats
the updates after that checkpoint exactly; on CPU the final weights are bitwise identical.

Stopping and resuming is not stopping. A run that ends at a limit (max_updates, max_epochs,
max_minutes, patience) or at Ctrl-C and is resumed with the limit raised ends where one run with
the raised limit ends, bitwise on CPU:

- the data: an update's ``update_freq`` micro-batches are drawn before its epoch is known; when
  the last of them lies past ``max_epochs``, they are put back (the sampler's position is
  restored), so the final checkpoint resumes at the first micro-batch not trained on;
- validations: the one at the end of a session (when its last update had none) is recorded, and
  it keeps OUT/best, but patience counts only the validations of the schedule (valid_every or
  valid_every_minutes), and neither it nor the checkpoint at the end moves the clock schedules
  (valid_every_minutes, save_every_minutes);
- Ctrl-C (train/interrupt.py) ends the run after the update in progress and after the validation
  and checkpoint due after it, exactly where an uninterrupted run carries on from.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model
from torch.nn.parallel import DistributedDataParallel

from .. import config as config_io
from .. import progress as progress_display
from ..allocator import active as allocator_in_use
from ..checkpoint import WEIGHTS, load_config, read_meta, read_weights, save_checkpoint
from ..data import PreparedData, TokenBatchSampler
from ..data.tokenizer import load_tokenizer, tokenizer_files
from ..errors import UserError
from ..files import ARTEFACTS, artefact_kind, describe, is_empty_dir, refuse_to_replace
from ..model import Transformer
from ..precision import (
    TRAIN_PRECISIONS,
    cpu_arithmetic,
    describe_precision,
    for_training,
    resolve_precision,
)
from . import distributed
from .advice import (
    PACE_SECONDS,
    PACE_SHARE,
    PACE_UPDATES,
    cooldown_line,
    stop_limits,
    vocabulary_warning,
    warmup_warning,
    warn,
)
from .config import RunConfig
from .dropout import use_fast_dropout
from .interrupt import StopRequest, TrainingInterrupted
from .products import Fp32Products, choose_fp32_products, mkl_linear, use_linear_library
from .schedule import budget_progress, cooldown_factor, inverse_sqrt_lr
from .state import (
    RNG,
    TRAINER_STATE,
    list_checkpoints,
    local_rng_state,
    optimizer_from_files,
    optimizer_to_files,
    point_last,
    prune_checkpoints,
    read_training_state,
    set_local_rng_state,
    step_dir_name,
    write_training_checkpoint,
)
from .step import Criterion, StepContext, UpdateResult, train_update
from .validation import ValidResult, validate

CONFIG_FILE, METRICS_FILE = "config.yaml", "metrics.jsonl"


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    stop_reason: str
    last_checkpoint: Path | None
    best_bleu: float | None
    last_valid: dict | None
    updates_skipped: int
    data_dir: Path | None = None  # the dataset trained on (for the evaluate command)
    averaged: Path | None = None  # OUT/averaged, when this session wrote it
    averaged_from: int = 0  # how many checkpoints it averages

    @property
    def model_dir(self) -> Path | None:
        """The model to use: OUT/averaged if this run wrote it (the paper's averaging, §6.1), else
        the newest checkpoint (OUT/last)."""
        if self.averaged is not None:
            return self.averaged
        last = self.out_dir / "last"
        return last if last.exists() else self.last_checkpoint

    def next_steps(self) -> str:
        """The report of ``aiayn train``: how the run ended, the model to use, and the commands
        that translate with it and score it on the dataset's test split."""
        bleu = f", best valid BLEU {self.best_bleu:.2f}" if self.best_bleu is not None else ""
        lines = [f"aiayn train: stopped at update {self.step} ({self.stop_reason}){bleu}"]
        model = self.model_dir
        if model is None:
            return lines[0]
        what = (f"the average of the last {self.averaged_from} checkpoints" if self.averaged is not None
                else "the newest checkpoint")
        if (self.out_dir / "best").is_dir():
            what += f"; {self.out_dir / 'best'}: the best valid BLEU"
        quoted = shlex.quote(str(model))
        lines += [f"  model      {model}  ({what})",
                  f"  translate  aiayn translate --checkpoint {quoted}"]
        if self.data_dir is not None:
            src, ref = (shlex.quote(str(self.data_dir / f"test.{side}")) for side in ("src", "tgt"))
            lines.append(f"  evaluate   aiayn evaluate --checkpoint {quoted} --src {src} --ref {ref}")
        return "\n".join(lines)


@dataclass
class Progress:
    """Counters saved with each checkpoint (trainer_state.json)."""

    step: int = 0
    skipped_total: int = 0
    skipped_in_row: int = 0
    overflow_total: int = 0
    best_bleu: float | None = None  # the best valid BLEU of any validation (OUT/best)
    best_step: int | None = None
    # Patience: the best BLEU of the scheduled validations, and how many of them in a row have
    # not beaten it (the validation at the end of a session counts for neither).
    patience_bleu: float | None = None
    bad_validations: int = 0
    last_valid_step: int = 0
    last_valid: dict | None = None
    elapsed_s: float = 0.0
    tokens_seen: int = 0
    last_save_s: float = 0.0  # elapsed_s at the last scheduled checkpoint / validation (for
    last_valid_s: float = 0.0  # the *_every_minutes cadences)

    @classmethod
    def from_state(cls, stored: dict, path: Path) -> Progress:
        """Progress from a checkpoint's trainer_state.json, also one written by an older version:
        its unused ``extra`` is dropped, and its patience is the best BLEU it had."""
        stored = {k: v for k, v in stored.items() if k != "extra"}
        unknown = sorted(set(stored) - {f.name for f in fields(cls)})
        if unknown:
            raise UserError(f"unknown progress field(s) {', '.join(unknown)} (written by a newer aiayn?)",
                            path=path / TRAINER_STATE)
        stored.setdefault("patience_bleu", stored.get("best_bleu"))
        return cls(**stored)


# ---------------------------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------------------------


def prepare_run_dir(out: Path, resume: bool, force: bool) -> str | None:
    """Create OUT or check it may be used; returns an error message instead of raising, so
    that rank 0 can hand it to the other ranks. --resume continues a run directory from its
    newest checkpoint (anything else is an error, never a new run); --force replaces a run
    directory, never anything else."""
    try:
        if resume:
            if not (out.exists() or out.is_symlink()):
                raise UserError("nothing to resume: the directory does not exist; drop --resume to start a new run",
                                path=out)
            if is_empty_dir(out):
                raise UserError("nothing to resume: the directory is empty; drop --resume to start a new run", path=out)
            if artefact_kind(out) != "run":
                raise UserError(f"cannot resume: {describe(out)}; --resume continues {ARTEFACTS['run']}", path=out)
            if not list_checkpoints(out):
                raise UserError("nothing to resume: the run holds no checkpoint (it stopped before its first one); "
                                "start it again with --force instead of --resume", path=out)
        elif artefact_kind(out) == "run" and not force:
            raise UserError("run directory already exists; pass --resume to continue it or --force to replace it",
                            path=out)
        else:
            refuse_to_replace(out, force, kind="run")
            if out.is_dir() and not is_empty_dir(out):
                shutil.rmtree(out)
    except UserError as e:
        return str(e)
    out.mkdir(parents=True, exist_ok=True)
    return None


def trim_metrics(path: Path, step: int) -> None:
    """On resume: drop the records of updates after the checkpoint (they will be redone)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if rec.get("step", 0) <= step and rec.get("kind") != "end":
            kept.append(line)
    path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")


class MetricsLog:
    """metrics.jsonl plus TensorBoard events; only rank 0 has one."""

    def __init__(self, out: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter  # imported late: slow import

        self.file = open(out / METRICS_FILE, "a", encoding="utf-8")
        self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step if start_step > 0 else None)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, sort_keys=False) + "\n")
        self.file.flush()
        kind, step = record.get("kind"), record.get("step", 0)
        if kind in ("train", "valid"):
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"{kind}/{key}", value, step)
            self.tb.flush()

    def close(self) -> None:
        self.file.close()
        self.tb.close()


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def micro_batch_tokens(batch_tokens: int, world_size: int, update_freq: int) -> int:
    """Each rank's share of the update's token budget, per micro-batch."""
    return max(1, math.ceil(batch_tokens / (world_size * update_freq)))


class Trainer:
    def __init__(self, cfg: RunConfig, data: PreparedData, out: Path, dist: distributed.DistContext,
                 init: str | Path | None = None):
        self.cfg, self.tcfg, self.data, self.out, self.dist = cfg, cfg.train, data, out, dist
        self.device = dist.device
        self.tokenizer = data.tokenizer
        self.tokenizer_sha256 = data.tokenizer.sha256
        tc = self.tcfg
        if tc.num_threads > 0:
            torch.set_num_threads(tc.num_threads)
        # The same initial weights on every rank (DDP also broadcasts rank 0's), then a
        # different dropout stream per rank.
        torch.manual_seed(tc.seed)
        # The arithmetic of this run on this machine (auto: bf16 where native); a resumed run may
        # resolve differently on another machine, which changes speed, not the recipe.
        self.precision = resolve_precision(tc.precision, self.device, allowed=TRAIN_PRECISIONS,
                                           setting="train.precision")
        model = Transformer(cfg.model)
        self.init = None if init is None else Path(init)
        self.init_name = None if init is None else self.init.resolve().name  # recorded: a name, not a path
        if self.init is not None:  # fine-tuning: the checkpoint's weights (its config is cfg.model)
            read_weights(model, self.init / WEIGHTS)
        self.model = for_training(use_fast_dropout(model).to(self.device), self.precision, self.device)
        self.fp32_products = self._choose_fp32_products(cfg)
        if self.fp32_products is not None:
            use_linear_library(self.model, self.fp32_products.library)
        torch.manual_seed(tc.seed + 1_000_003 * (dist.rank + 1))
        if self.device.type == "cuda":
            torch.cuda.manual_seed(tc.seed + 1_000_003 * (dist.rank + 1))
        # PyTorch's fused Adam: the same update in one kernel over all parameters (on a CPU the
        # default loops over them, several passes each; measured in docs/experiments.md). Its
        # results differ from the loop's by fp32 rounding only; a run and its resumption both
        # use it, so resume stays exact.
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.0, betas=(tc.adam_beta1, tc.adam_beta2),
                                          eps=tc.adam_eps, weight_decay=tc.weight_decay,
                                          fused=self.device.type in ("cpu", "cuda"))
        scaler = None
        if self.precision == "fp16":
            scaler = torch.amp.GradScaler(self.device.type)
        self.step_ctx = StepContext(label_smoothing=tc.label_smoothing, clip_norm=tc.clip_norm,
                                    precision=self.precision, scaler=scaler, dist=dist)
        train = data.split("train")
        longest = int(max(train.src_lens.max(initial=0), train.tgt_lens.max(initial=0)))
        if cfg.model.positions == "learned" and longest + 1 > cfg.model.max_positions:  # + EOS, or BOS
            raise UserError(f"training pairs of up to {longest} subwords, but learned positions leave room for "
                            f"{cfg.model.max_positions - 1} (model.max_positions {cfg.model.max_positions}); raise "
                            f"model.max_positions or prepare with --max-len {cfg.model.max_positions - 1}",
                            path=data.path)
        self.sampler = TokenBatchSampler(
            train.src_lens, train.tgt_lens, micro_batch_tokens(tc.batch_tokens, dist.world_size, tc.update_freq),
            shuffle=True, seed=tc.seed, num_shards=dist.world_size, shard_id=dist.rank)
        if len(self.sampler) < 1:
            raise UserError(f"the training set gives no batch for each of {dist.world_size} processes; "
                            "use fewer processes or a larger dataset")
        self.train_split = train
        self.progress = Progress()
        # What an update runs: the model with its loss (wrapped in DDP when distributed).
        self.criterion: torch.nn.Module = Criterion(
            self.model, tc.label_smoothing,
            self.fp32_products.linear if self.fp32_products is not None else mkl_linear)
        self.log: MetricsLog | None = None
        self.bar = None  # the progress display (rank 0, train.progress)
        self._postfix: dict[str, str] = {}  # what the progress bar shows after it
        self._projected = False  # the time budget's end was estimated (once a session)
        self.last_lr = 0.0  # the rate of the latest update

    # -- learning rate ----------------------------------------------------------------------------
    def lr(self, step: int, elapsed_s: float = 0.0) -> float:
        """The rate of update ``step`` (1-based), begun ``elapsed_s`` into the run: §5.3's
        schedule, times the cool-down's factor when train.cooldown is set."""
        tc = self.tcfg
        rate = inverse_sqrt_lr(step, self.cfg.model.d_model, tc.warmup, tc.lr_factor)
        if tc.cooldown > 0:
            rate *= cooldown_factor(budget_progress(step, tc.max_updates, elapsed_s, tc.max_minutes), tc.cooldown)
        return rate

    def _next_lr(self, elapsed_s: float) -> float:
        """The rate of the next update. Under a cool-down with a wall-clock budget the ranks'
        clocks differ a little, so they agree on the mean of their elapsed times first."""
        if self.tcfg.cooldown > 0 and self.tcfg.max_minutes > 0 and self.dist.distributed:
            elapsed_s = self.dist.all_reduce_sum([elapsed_s])[0] / self.dist.world_size
        self.last_lr = self.lr(self.progress.step + 1, elapsed_s)
        return self.last_lr

    # -- data ---------------------------------------------------------------------------------
    def batch_stream(self) -> Iterator[tuple[int, list[int]]]:
        """(epoch, indices) forever; the sampler's position makes it resumable."""
        epoch = self.sampler.epoch
        while True:
            self.sampler.set_epoch(epoch)
            for indices in self.sampler:
                yield epoch, indices
            epoch += 1

    # -- checkpoints --------------------------------------------------------------------------
    def gather_rng(self) -> dict[str, torch.Tensor]:
        """Every rank's RNG states, named by rank (a collective: all ranks call it)."""
        out: dict[str, torch.Tensor] = {}
        for key, state in sorted(local_rng_state(self.device).items()):
            state = state.to(self.dist.comm_device)
            if self.dist.distributed:
                parts = [torch.empty_like(state) for _ in range(self.dist.world_size)]
                torch.distributed.all_gather(parts, state)
            else:
                parts = [state]
            for rank, part in enumerate(parts):
                out[f"{key}.rank{rank}"] = part.cpu().contiguous()
        return out

    def save(self, scheduled: bool = True) -> Path | None:
        """Write OUT/checkpoints/step_N atomically (rank 0), prune old ones, point OUT/last.
        A checkpoint off the schedule (at the end of a session) leaves save_every_minutes' clock."""
        if scheduled:
            self.progress.last_save_s = self.progress.elapsed_s  # before the state is written
        rng = self.gather_rng()  # collective: before the rank check
        if not self.dist.is_main:
            self.dist.barrier()
            return None
        p = self.progress
        opt_tensors, opt_meta = optimizer_to_files(self.optimizer)
        state = {
            "step": p.step,
            "sampler": self.sampler.state_dict(),
            "optimizer": opt_meta,
            "scaler": self.step_ctx.scaler.state_dict() if self.step_ctx.scaler is not None else None,
            "progress": {k: v for k, v in vars(p).items()},
            "world_size": self.dist.world_size,
            "config_digest": self.cfg.digest(),
            # the fp32 products' library measured at the start, kept on resume on the same CPU
            "fp32_products": None if self.fp32_products is None else
            {"library": self.fp32_products.library, "cpu": cpu_arithmetic().describe()},
        }
        path = self.out / "checkpoints" / step_dir_name(p.step)
        write_training_checkpoint(path, self.model, self.tokenizer, self.meta(), opt_tensors, rng, state)
        point_last(self.out, path)
        prune_checkpoints(self.out, self.tcfg.keep_last)
        self.dist.barrier()
        return path

    def meta(self) -> dict[str, Any]:
        p = self.progress
        # Names, not paths: a checkpoint is copied between machines, and meta.json must not
        # carry one machine's directory layout (or its user name) along.
        return {"step": p.step, "run": self.out.resolve().name, "data": self.data.path.resolve().name,
                "data_fingerprint": self.data.manifest.get("fingerprint"), "tokenizer_sha256": self.tokenizer_sha256,
                "config_digest": self.cfg.digest(), "valid": p.last_valid,
                "languages": self.data.manifest.get("languages"),
                "initialised_from": self.init_name,
                "search": config_io.to_dict(self.cfg.search)}  # recommended for this model (Checkpoint.search)

    def check_same_data(self, path: Path) -> None:
        """--resume needs the dataset and the subword model the run started with: the data
        position, the vocabulary and the embedding rows in checkpoint ``path`` refer to them."""
        recorded, here = read_meta(path).get("data_fingerprint"), self.data.manifest.get("fingerprint")
        differs = []
        if recorded is not None and recorded != here:
            differs.append(f"dataset fingerprint {str(here)[:12]}, the run's {recorded[:12]}")
        # The checkpoint's tokenizer files are the run's own copy of its tokenizer.
        if load_tokenizer(path).sha256 != self.tokenizer_sha256:
            differs.append(f"its tokenizer ({', '.join(tokenizer_files(path) or ())}) is not the run's")
        if differs:
            raise UserError(f"cannot resume {self.out} with this dataset: {'; '.join(differs)} "
                            f"(checkpoint {path.name}); give the --data the run started with, or start a new run",
                            path=self.data.path)

    def restore(self, path: Path) -> None:
        """Load a training checkpoint into this trainer (every rank reads the same files)."""
        state, opt_tensors, rng = read_training_state(path)
        self.check_same_data(path)
        saved = load_config(path)
        if saved != self.cfg.model:
            changed = sorted(k for k, v in saved.to_dict().items() if getattr(self.cfg.model, k) != v)
            raise UserError(f"cannot resume: the model config differs from the checkpoint's ({', '.join(changed)})",
                            path=path / "config.yaml")
        load_model(self.model, str(path / "model.safetensors"), strict=True, device=str(self.device))
        optimizer_from_files(self.optimizer, opt_tensors, state["optimizer"])
        try:
            self.sampler.load_state_dict(state["sampler"])
        except ValueError as e:
            raise UserError(f"cannot resume with this config: {e} (batch_tokens, update_freq, seed and the "
                            "number of processes must stay as they were)", path=path) from None
        if state.get("scaler") and self.step_ctx.scaler is not None:
            self.step_ctx.scaler.load_state_dict(state["scaler"])
        self.progress = Progress.from_state(state["progress"], path)
        self._resume_fp32_products(state.get("fp32_products"))
        mine = {key.split(".rank")[0]: t for key, t in rng.items() if key.endswith(f".rank{self.dist.rank}")}
        if "cpu" not in mine:
            raise UserError(f"{RNG} has no RNG state for rank {self.dist.rank}", path=path)
        set_local_rng_state(mine, self.device)

    def _resume_fp32_products(self, saved: dict | None) -> None:
        """A run resumed on the same kind of CPU keeps the fp32 library its first session
        measured, so that "auto" cannot flip between sessions on a close measurement."""
        chosen = self.fp32_products
        if chosen is None or saved is None or chosen.setting != "auto" or saved.get("cpu") != cpu_arithmetic().describe():
            return
        if saved.get("library") in ("mkl", "onednn") and saved["library"] != chosen.library:
            self.fp32_products = chosen.resumed(saved["library"])
            use_linear_library(self.model, self.fp32_products.library)
            self.criterion.linear = self.fp32_products.linear

    # -- validation -----------------------------------------------------------------------------
    def validate_and_track(self, scheduled: bool = True) -> bool:
        """Rank 0 validates, keeps OUT/best, and counts patience; True if patience ran out.
        ``scheduled``: a validation of valid_every / valid_every_minutes; the one at the end of a
        session is not, and moves neither patience nor the clock (see the module docstring)."""
        p, tc = self.progress, self.tcfg
        stop = False
        p.last_valid_step = p.step  # on every rank: it decides whether all ranks validate at the end
        if scheduled:
            p.last_valid_s = p.elapsed_s
        if self.dist.is_main:
            self._bar_status("validating")
            try:
                res: ValidResult = validate(
                    self.model, self.data, label_smoothing=tc.label_smoothing, batch_tokens=tc.valid_batch_tokens,
                    bleu_sentences=tc.valid_bleu_sentences, max_len_a=tc.valid_max_len_a,
                    max_len_b=tc.valid_max_len_b, precision=self.precision, device=self.device)
            finally:
                self._bar_status(None)
            p.last_valid = {"step": p.step, **res.as_dict()}
            better = res.bleu is not None and (p.best_bleu is None or res.bleu > p.best_bleu)
            if better:
                p.best_bleu, p.best_step = res.bleu, p.step
                save_checkpoint(self.out / "best", self.model, self.tokenizer, self.meta(), force=True)
            if scheduled:
                if res.bleu is not None and (p.patience_bleu is None or res.bleu > p.patience_bleu):
                    p.patience_bleu, p.bad_validations = res.bleu, 0
                else:
                    p.bad_validations += 1
                stop = tc.patience > 0 and p.bad_validations >= tc.patience
            self.record({"kind": "valid", "step": p.step, **res.as_dict(), "best_bleu": p.best_bleu,
                         "best_step": p.best_step, "elapsed_s": p.elapsed_s})
        # The other ranks wait here, and learn rank 0's decision.
        return self.dist.any(stop)

    def record(self, rec: dict) -> None:
        if self.log is not None:
            self.log.write(rec)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        tc, p, dist = self.tcfg, self.progress, self.dist
        if dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.criterion = DistributedDataParallel(self.criterion, device_ids=ids)
        self.model.train()
        if dist.is_main:
            self.log = MetricsLog(self.out, p.step)
            self.record({"kind": "start", "step": p.step, "world_size": dist.world_size, "device": str(self.device),
                         "precision": self.precision, "precision_setting": tc.precision,
                         **(self.fp32_products.record() if self.fp32_products is not None else {}),
                         "cpu": cpu_arithmetic().describe() if self.device.type == "cpu" else None,
                         "parameters": self.model.num_parameters(), "micro_batch_tokens": self.sampler.max_tokens,
                         "update_freq": tc.update_freq, "train_batches_per_epoch": len(self.sampler),
                         "threads": torch.get_num_threads(), "allocator": allocator_in_use(),
                         # real / padded tokens of this epoch's batches (§5.1's length grouping at work)
                         "padding_efficiency": round(self.sampler.stats()["padding_efficiency"], 4),
                         "initialised_from": self.init_name})
            self._announce()
        bar = self.bar = self._progress_bar()
        stream = self.batch_stream()
        started = time.perf_counter() - p.elapsed_s
        session = (p.step, p.elapsed_s)  # where this session started: the pace of the time budget
        window = {"loss": 0.0, "nll": 0.0, "tokens": 0, "src_tokens": 0, "correct": 0, "updates": 0,
                  "t0": time.perf_counter()}
        last_saved = p.step if p.step > 0 else -1  # p.step > 0: restored from that checkpoint
        stop_reason = "max_updates"
        saved_path: Path | None = None
        averaged: tuple[Path | None, int] = (None, 0)
        request = StopRequest(announce=dist.is_main)
        try:
            with request:
                while p.step < tc.max_updates:
                    if dist.any(request.requested):  # Ctrl-C: after the update, its validation and checkpoint
                        stop_reason = "interrupted"
                        break
                    position = self.sampler.state_dict()
                    batches, epoch = [], 0
                    for _ in range(tc.update_freq):
                        epoch, indices = next(stream)
                        batches.append(self.train_split.collate(indices))
                    if tc.max_epochs and epoch >= tc.max_epochs:
                        # Not trained on: put them back, so that a run resumed with a higher
                        # max_epochs takes this update as one run without the stop does.
                        stream.close()
                        self.sampler.load_state_dict(position)
                        stop_reason = "max_epochs"
                        break
                    lr = self._next_lr(time.perf_counter() - started)
                    res = train_update(self.criterion, self.optimizer, batches, lr, self.step_ctx)
                    p.elapsed_s = time.perf_counter() - started
                    if res.skipped:
                        self._count_skip(res)
                        continue
                    p.skipped_in_row = 0
                    p.step += 1
                    p.tokens_seen += res.n_tokens
                    self._accumulate(window, res)
                    if bar is not None:
                        self._advance(bar)
                    if p.step % tc.log_every == 0 or p.step == tc.max_updates:
                        self._log_train(window, bar)
                    self._project_time_budget(*session)
                    stop = False
                    paused = time.perf_counter()
                    if self._due(tc.valid_every, tc.valid_every_minutes, p.last_valid_s):
                        if self.validate_and_track():
                            stop, stop_reason = True, "patience"
                    if self._due(tc.save_every, tc.save_every_minutes, p.last_save_s):
                        saved_path, last_saved = self.save(), p.step
                    window["t0"] += time.perf_counter() - paused  # tokens/s counts training time only
                    out_of_time = tc.max_minutes > 0 and p.elapsed_s >= tc.max_minutes * 60
                    if dist.any(out_of_time) and not stop:
                        stop, stop_reason = True, "max_minutes"
                    if stop:
                        break
                # The end: a last validation and checkpoint unless this step already has them;
                # after Ctrl-C only the checkpoint.
                interrupted = stop_reason == "interrupted"
                if not interrupted and p.last_valid_step != p.step and p.step > 0:
                    self.validate_and_track(scheduled=False)
                interrupted = dist.any(request.requested)
                if last_saved != p.step:
                    saved_path = self.save(scheduled=False)
                elif dist.is_main:
                    saved_path = self.out / "checkpoints" / step_dir_name(p.step)
                if interrupted:
                    stop_reason = "interrupted"
                elif dist.is_main and tc.average_last >= 2:
                    averaged = self._average_last()
                self.record({"kind": "end", "step": p.step, "reason": stop_reason, "elapsed_s": p.elapsed_s,
                             "best_bleu": p.best_bleu, "best_step": p.best_step, "updates_skipped": p.skipped_total,
                             "fp16_overflows": p.overflow_total, "tokens_seen": p.tokens_seen})
        except KeyboardInterrupt as e:
            if isinstance(e, TrainingInterrupted):
                raise
            # A second Ctrl-C (or a KeyboardInterrupt from elsewhere): anywhere, even half-way
            # through an update, so nothing is saved; the newest checkpoint is intact.
            newest = list_checkpoints(self.out)
            raise TrainingInterrupted(self.out, p.step, newest[-1] if newest else None, saved=False,
                                      world_size=dist.world_size) from None
        finally:
            if bar is not None:
                bar.close()
            self.bar = None
            if self.log is not None:
                self.log.close()
        if stop_reason == "interrupted":
            raise TrainingInterrupted(self.out, p.step, self.out / "checkpoints" / step_dir_name(p.step), saved=True,
                                      world_size=dist.world_size)
        return TrainResult(self.out, p.step, stop_reason, saved_path, p.best_bleu, p.last_valid, p.skipped_total,
                           data_dir=self.data.path, averaged=averaged[0], averaged_from=averaged[1])

    # -- what the run says ------------------------------------------------------------------------
    def _epochs_end(self) -> int | None:
        """The update at which max_epochs ends (None without it): the micro-batches left before
        the limit, counting this epoch's number for every epoch, over update_freq."""
        if not self.tcfg.max_epochs:
            return None
        left = (self.tcfg.max_epochs - self.sampler.epoch) * len(self.sampler) - self.sampler.position
        return self.progress.step + max(0, left) // self.tcfg.update_freq

    def _choose_fp32_products(self, cfg) -> Fp32Products | None:
        """MKL or oneDNN for this run's fp32 products (`aiayn.train.products`). Rank 0 measures
        (ranks sharing a machine would disturb each other's timings) and every rank follows it."""
        tc, dist = self.tcfg, self.dist
        shape = dict(rows=micro_batch_tokens(tc.batch_tokens, dist.world_size, tc.update_freq),
                     d_model=cfg.model.d_model, d_ff=cfg.model.d_ff)
        if not dist.distributed or tc.fp32_products != "auto":  # nothing to measure, or one process
            return choose_fp32_products(tc.fp32_products, self.precision, self.device, **shape)
        chosen = choose_fp32_products("auto", self.precision, self.device, **shape) if dist.is_main else None
        if self.precision != "fp32" or self.device.type != "cpu":
            return chosen
        onednn = dist.all_reduce_sum([1.0 if chosen is not None and chosen.library == "onednn" else 0.0])[0] > 0
        return chosen if dist.is_main else Fp32Products("onednn" if onednn else "mkl", "auto")

    def _announce(self) -> None:
        """Rank 0, at the start: the limits that stop the run, and warnings about the recipe."""
        tc, p = self.tcfg, self.progress
        epochs_end = self._epochs_end()
        print(f"aiayn train: {stop_limits(tc, epochs_end=epochs_end, elapsed_s=p.elapsed_s)}", file=sys.stderr,
              flush=True)
        if tc.cooldown > 0:
            line, warning = cooldown_line(tc, epochs_end=epochs_end)
            print(f"aiayn train: {line}", file=sys.stderr, flush=True)
            warn(warning)
        print(f"aiayn train: {describe_precision(self.precision, tc.precision, self.device)}", file=sys.stderr,
              flush=True)
        if self.fp32_products is not None:
            print(f"aiayn train: {self.fp32_products.describe()}", file=sys.stderr, flush=True)
        train = self.train_split
        warn(vocabulary_warning(self.data.tokenizer.vocab_size, int(train.src_lens.sum() + train.tgt_lens.sum())))
        end = min(tc.max_updates, epochs_end if epochs_end is not None else tc.max_updates)
        warn(warmup_warning(end, tc.warmup, f"the run ends at update {end}"))

    def _project_time_budget(self, start_step: int, start_s: float) -> None:
        """Once a session, under max_minutes (rank 0): after its first updates, the update at which
        the budget ends at the pace so far (this session's updates over its training time), or the
        time at which max_updates / max_epochs comes first; a warning if the budget ends inside
        the warm-up. See advice.PACE_*."""
        tc, p = self.tcfg, self.progress
        if self._projected or tc.max_minutes <= 0 or not self.dist.is_main:
            return
        budget = tc.max_minutes * 60
        updates, seconds = p.step - start_step, p.elapsed_s - start_s
        if updates < PACE_UPDATES or seconds < min(PACE_SECONDS, PACE_SHARE * (budget - start_s)):
            return
        self._projected = True
        if p.elapsed_s >= budget:
            return
        rate = updates / seconds
        pace = f"at this pace ({rate * 60:.0f} updates a minute)"
        epochs_end = self._epochs_end()
        limit = min(tc.max_updates, epochs_end if epochs_end is not None else tc.max_updates)
        projected = p.step + round(rate * (budget - p.elapsed_s))
        if projected < limit:
            what = f"{pace} the {tc.max_minutes:g}-minute budget ends near update {projected}"
            warning = warmup_warning(projected, tc.warmup, what)
            self._say(f"aiayn: warning: {warning}" if warning else f"aiayn train: {what}")
        else:
            minutes = (p.elapsed_s + (limit - p.step) / rate) / 60
            self._say(f"aiayn train: {pace} the run reaches update {limit} after about {minutes:.1f} minutes, "
                      f"within the {tc.max_minutes:g}-minute budget")

    def _say(self, line: str) -> None:
        """A line on standard error that does not break a tqdm bar."""
        write = getattr(type(self.bar), "write", None)
        if write is not None:
            write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def _due(self, every_updates: int, every_minutes: float, last_s: float) -> bool:
        """Whether a checkpoint (or validation) is due after this update: every_minutes of
        wall-clock time since the last one when set (all ranks follow rank 0's clock, so they
        agree), else every every_updates updates (0: never)."""
        p = self.progress
        if every_minutes > 0:
            return self.dist.any(self.dist.is_main and p.elapsed_s - last_s >= every_minutes * 60)
        return every_updates > 0 and p.step % every_updates == 0

    def _count_skip(self, res: UpdateResult) -> None:
        p = self.progress
        if res.overflow:  # fp16: the grad scaler lowers its scale and tries again
            p.overflow_total += 1
            return
        p.skipped_total += 1
        p.skipped_in_row += 1
        self.record({"kind": "skip", "step": p.step, "loss": res.loss if math.isfinite(res.loss) else str(res.loss),
                     "grad_norm": res.grad_norm if math.isfinite(res.grad_norm) else str(res.grad_norm)})
        if p.skipped_in_row >= self.tcfg.max_nonfinite:
            raise UserError(
                f"training diverged: {p.skipped_in_row} consecutive updates with a non-finite loss or gradient "
                f"after update {p.step} (the weights were not touched by them; the last checkpoint is intact). "
                "Lower train.lr_factor, raise train.warmup, set train.clip_norm, or use precision fp32.")

    @staticmethod
    def _accumulate(window: dict, res: UpdateResult) -> None:
        window["loss"] += res.loss_sum
        window["nll"] += res.nll_sum
        window["tokens"] += res.n_tokens
        window["src_tokens"] += res.n_src_tokens
        window["correct"] += res.n_correct
        window["updates"] += 1

    def _log_train(self, window: dict, bar) -> None:
        p = self.progress
        now = time.perf_counter()
        seconds = max(now - window["t0"], 1e-9)
        tokens = max(window["tokens"], 1)
        nll = window["nll"] / tokens
        rec = {"kind": "train", "step": p.step, "loss": window["loss"] / tokens, "nll": nll,
               "ppl": math.exp(min(nll, 700.0)), "accuracy": window["correct"] / tokens, "lr": self.last_lr,
               "tgt_tokens_per_s": window["tokens"] / seconds,
               "src_tokens_per_s": window["src_tokens"] / seconds,
               "tgt_tokens_per_update": window["tokens"] / max(window["updates"], 1),
               "elapsed_s": p.elapsed_s, "updates_skipped": p.skipped_total}
        self.record(rec)
        if bar is not None:
            self._postfix.update(loss=f"{rec['loss']:.3f}", ppl=f"{rec['ppl']:.1f}", lr=f"{rec['lr']:.2e}",
                                 tok_s=f"{rec['tgt_tokens_per_s']:.0f}")
            bar.set_postfix(self._postfix, refresh=False)
        window.update(loss=0.0, nll=0.0, tokens=0, src_tokens=0, correct=0, updates=0, t0=now)

    def _progress_bar(self):
        """The bar counts what ends the run: with a wall-clock budget (max_minutes) the budget's
        seconds, the updates in its postfix (counting to max_updates, a 10-minute run showed a
        28-hour ETA); otherwise the updates to max_updates. `aiayn.progress.progress_bar`: a tqdm
        bar on a terminal, a plain line every PLAIN_EVERY_S seconds in a redirected log."""
        if not (self.dist.is_main and self.tcfg.progress):
            return None
        self._postfix["precision"] = self.precision
        if self.tcfg.max_minutes > 0:
            budget = self.tcfg.max_minutes * 60
            self._postfix["upd"] = str(self.progress.step)
            return progress_display.progress_bar(
                budget, "train", "s", initial=min(self.progress.elapsed_s, budget), postfix=self._postfix,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of the time budget, "
                           "{remaining} left{postfix}")
        return progress_display.progress_bar(self.tcfg.max_updates, "train", "upd", initial=self.progress.step)

    def _bar_status(self, status: str | None) -> None:
        """What the bar shows besides training: 'train (validating)' while validation runs."""
        if self.bar is not None:
            self.bar.set_description(f"train ({status})" if status else "train")

    def _advance(self, bar) -> None:
        """After an update: one more update, or the seconds of the budget spent so far."""
        p = self.progress
        if self.tcfg.max_minutes > 0:
            bar.update(round(min(p.elapsed_s, bar.total), 1) - bar.n)  # tenths: a log's lines stay short
            self._postfix["upd"] = str(p.step)
            bar.set_postfix(self._postfix, refresh=False)
        else:
            bar.update(1)

    def _average_last(self) -> tuple[Path | None, int]:
        """OUT/averaged from the last average_last checkpoints (at least 2): (its path, how many)."""
        from .average import average_checkpoints

        ckpts = list_checkpoints(self.out)[-self.tcfg.average_last:]
        if len(ckpts) < 2:
            return None, 0
        return average_checkpoints(ckpts, self.out / "averaged", force=True), len(ckpts)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def run_training(cfg: RunConfig, data: PreparedData, out: str | Path, *, resume: bool = False,
                 force: bool = False, init: str | Path | None = None) -> TrainResult:
    """Train ``cfg`` on ``data`` into run directory ``out`` (see the module docstring); a new
    run with ``init`` starts from that checkpoint's weights (a resumed one from its own)."""
    out = Path(out)
    dist = distributed.setup(cfg.train.device)
    try:
        # The trainer checks the config against the data before OUT is touched: a mistake must
        # not cost the run that --force would replace.
        trainer = Trainer(cfg, data, out, dist, init=init)
        dist.broadcast_error(prepare_run_dir(out, resume, force) if dist.is_main else None)
        ckpts = list_checkpoints(out) if resume else []
        if ckpts:
            trainer.restore(ckpts[-1])
            if dist.is_main:
                trim_metrics(out / METRICS_FILE, trainer.progress.step)
                print(f"aiayn train: resuming {out} from {ckpts[-1].name} (update {trainer.progress.step})",
                      file=sys.stderr)
        if dist.is_main:
            config_io.save_yaml(cfg.to_dict(), out / CONFIG_FILE)
        dist.barrier()
        try:
            result = trainer.fit()
        except TrainingInterrupted as e:
            if e.saved:
                dist.barrier()  # as below: rank 0 has written the checkpoint; leave together
            raise
        # All ranks leave together: rank 0 may still be validating, saving or averaging, and a
        # peer that tears gloo down meanwhile can abort the process ("terminate called ...").
        dist.barrier()
        return result
    finally:
        distributed.teardown()
