"""The training stage (paper §5): ``aiayn train``, ``aiayn average``, ``aiayn plot``.

    config.py       TrainConfig (the ``train:`` section) and config resolution
    loss.py         label-smoothed cross-entropy (§5.4)
    schedule.py     lr = factor · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5) (§5.3); the cool-down
    step.py         one update: token-normalised gradient accumulation, DDP, clipping, skips
    trainer.py      the loop: validation, checkpoints, exact resume, logs, the report at the end
    interrupt.py    Ctrl-C: stop after the update in progress with a checkpoint (TrainingInterrupted)
    advice.py       which limit stops a run; warnings (vocabulary, warm-up, cool-down); the command to resume
    state.py        resume state beside the weights (safetensors + JSON, no pickle)
    distributed.py  torchrun / DistributedDataParallel (NCCL on GPU, gloo on CPU)
    average.py      checkpoint averaging (§6.1)
    plot.py         loss and BLEU curves

Python API::

    from aiayn.train import train
    result = train("configs/copy.yaml", "data/copy", "runs/copy", overrides=["train.max_updates=300"])
    result.last_checkpoint   # a directory aiayn.checkpoint.load_checkpoint reads
    result.model_dir         # the model to use: OUT/averaged if the run wrote it, else OUT/last
    print(result.next_steps())

Ctrl-C raises `TrainingInterrupted` (a KeyboardInterrupt) once the checkpoint is written; its
``command`` continues the run exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .average import average_checkpoints
from .config import RunConfig, TrainConfig, load_raw_config, resolve_config
from .interrupt import TrainingInterrupted
from .loss import label_smoothed_loss
from .schedule import inverse_sqrt_lr
from .trainer import TrainResult, run_training


def train(config: str | Path | dict[str, Any], data: str | Path, out: str | Path, overrides: Sequence[str] = (),
          *, resume: bool = False, force: bool = False, init: str | Path | None = None) -> TrainResult:
    """Train from a config file (or mapping) on a prepared dataset directory into ``out``.
    ``init``: a checkpoint to start from (fine-tuning: `config.init_from_checkpoint`).
    Ctrl-C raises `TrainingInterrupted` with the command that continues the run."""
    import os

    from .. import config as config_io
    from ..data import load_dataset
    from ..precision import limit_onednn_cache
    from .advice import resume_command
    from .trainer import CONFIG_FILE

    limit_onednn_cache()  # before this process's first oneDNN product, where this is the first
    if isinstance(config, dict):
        raw, where = config_io.apply_overrides(config, list(overrides)), "config"
    else:
        raw, where = load_raw_config(config, list(overrides)), str(config)
    dataset = load_dataset(data)
    if init is not None:
        from .config import init_from_checkpoint

        raw = init_from_checkpoint(raw, init, dataset, where)
    tok = dataset.tokenizer
    cfg = resolve_config(raw, (tok.src_vocab_size, tok.vocab_size), where=where)
    try:
        return run_training(cfg, dataset, out, resume=resume, force=force, init=init)
    except TrainingInterrupted as e:
        # A mapping is continued from the run's own resolved config (overrides included).
        again = (Path(out) / CONFIG_FILE, ()) if isinstance(config, dict) else (config, overrides)
        e.command = resume_command(again[0], data, out, again[1], has_checkpoint=e.checkpoint is not None,
                                   init=init,
                                   world_size=e.world_size,
                                   local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", e.world_size)))
        raise


__all__ = ["train", "TrainConfig", "RunConfig", "TrainResult", "TrainingInterrupted",
           "resolve_config", "run_training", "average_checkpoints", "label_smoothed_loss", "inverse_sqrt_lr"]
