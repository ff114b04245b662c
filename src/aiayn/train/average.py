"""Checkpoint averaging (§6.1): "For the base models, we used a single model obtained by
averaging the last 5 checkpoints, which were written at 10-minute intervals. For the big
models, we averaged the last 20 checkpoints."

Every weight tensor is the arithmetic mean of that tensor over the checkpoints, accumulated
in float64 and cast back, so averaging identical checkpoints returns them bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from ..errors import UserError
from ..files import refuse_to_replace
from .state import list_checkpoints

# What an averaged checkpoint's meta.json carries over from the first checkpoint averaged.
PROVENANCE = ("run", "data", "data_fingerprint", "tokenizer_sha256", "languages", "config_digest", "search")


def average_checkpoints(paths: list[Path], out: Path, *, force: bool = False) -> Path:
    """Average the weights of ``paths`` (same architecture and tokenizer) into checkpoint ``out``."""
    if not paths:
        raise UserError("no checkpoints to average")
    refuse_to_replace(out, force, kind="checkpoint")  # before the work; save_checkpoint checks again
    first: Checkpoint = load_checkpoint(paths[0])
    config = first.model.config
    spm_bytes = (paths[0] / "spm.model").read_bytes()
    total = {k: v.detach().to(torch.float64).clone() for k, v in first.model.state_dict().items()}
    for path in paths[1:]:
        ckpt = load_checkpoint(path)
        if ckpt.model.config != config:
            raise UserError(f"model config differs from {paths[0]}; only checkpoints of one model can be averaged",
                            path=path)
        if (path / "spm.model").read_bytes() != spm_bytes:
            raise UserError(f"subword model differs from {paths[0]}", path=path)
        for key, value in ckpt.model.state_dict().items():
            total[key] += value.to(torch.float64)
        del ckpt
    n = len(paths)
    state = first.model.state_dict()
    averaged = {k: (total[k] / n).to(state[k].dtype) for k in state}
    first.model.load_state_dict(averaged, strict=True)
    # Portable provenance: the checkpoints' directory names and what the first one says of its
    # run and data (names only: checkpoints of older versions recorded absolute paths there).
    carried = {key: first.meta[key] for key in PROVENANCE if key in first.meta}
    for key in ("run", "data"):
        if isinstance(carried.get(key), str):
            carried[key] = Path(carried[key]).name
    meta = {**carried, "averaged_from": [p.resolve().name for p in paths], "n_averaged": n,
            "step": first.meta.get("step") if n == 1 else _last_step(paths)}
    return save_checkpoint(out, first.model, first.tokenizer, meta, force=force)


def _last_step(paths: list[Path]) -> int | None:
    steps = []
    for p in paths:
        try:
            steps.append(int(p.name.split("_")[-1]))
        except ValueError:
            return None
    return max(steps)


def resolve_inputs(items: list[str], last: int | None) -> list[Path]:
    """Checkpoint directories as given, or with ``--last K`` the last K of a run directory."""
    paths = [Path(p) for p in items]
    if last is not None:
        if last < 1:
            raise UserError("--last must be at least 1")
        if len(paths) != 1:
            raise UserError("--last K takes one run directory")
        found = list_checkpoints(paths[0])
        if not found:
            raise UserError("no checkpoints (expected RUN/checkpoints/step_*)", path=paths[0])
        if len(found) < last:
            raise UserError(f"has only {len(found)} checkpoints, --last asks for {last}", path=paths[0])
        return found[-last:]
    for p in paths:
        if not p.is_dir():
            raise UserError("no such checkpoint directory", path=p)
        if not (p / "model.safetensors").is_file() and list_checkpoints(p):
            raise UserError("is a run directory; pass --last K to average its last K checkpoints", path=p)
    return paths

