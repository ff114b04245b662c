"""Resume state saved beside a checkpoint's weights — no pickle anywhere.

A training checkpoint directory holds the four files of `aiayn.checkpoint` (weights, model
config, tokenizer, meta) plus:

    optimizer.safetensors   Adam's per-parameter tensors, named ``state.<i>.<key>``
    rng.safetensors         RNG states as uint8 tensors, ``cpu.rank<r>`` / ``cuda.rank<r>``
    trainer_state.json      every scalar: step, data position, optimizer hyper-parameters,
                            grad-scaler state, best BLEU, patience, clocks, ...

Tensors go to safetensors and scalars to JSON, so reading a checkpoint never runs code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..checkpoint import write_checkpoint_files
from ..errors import UserError
from ..files import atomic_directory

OPTIMIZER, RNG, TRAINER_STATE = "optimizer.safetensors", "rng.safetensors", "trainer_state.json"
STEP_DIR = re.compile(r"^step_(\d{7,})$")


# -- optimizer ---------------------------------------------------------------------------------


def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state_dict split into tensors (for safetensors) and JSON scalars."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalar_state": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta.get("scalar_state", {}).items():
        state.setdefault(int(idx), {}).update(entry)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- RNG -----------------------------------------------------------------------------------------


def local_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states (dropout draws from them) as uint8 tensors."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_local_rng_state(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


# -- checkpoint directories ------------------------------------------------------------------------


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(run_or_dir: Path) -> list[Path]:
    """Finished checkpoints of a run (``RUN/checkpoints/step_*``), oldest first.
    Temporary directories of an interrupted write start with '.' and are not listed."""
    root = run_or_dir / "checkpoints" if (run_or_dir / "checkpoints").is_dir() else run_or_dir
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))] if root.is_dir() else []
    return [p for _, p in sorted(found)]


def write_training_checkpoint(
    path: Path,
    model: torch.nn.Module,
    tokenizer,
    meta: dict[str, Any],
    optimizer_tensors: dict[str, torch.Tensor],
    rng: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
) -> None:
    """All files into a temporary sibling directory, then one atomic rename to ``path``:
    a process killed mid-write leaves a '.step_*' directory that is ignored and cleaned up."""
    with atomic_directory(path, kind="checkpoint", force=True) as tmp:
        write_checkpoint_files(tmp, model, tokenizer, meta)
        save_file(optimizer_tensors, str(tmp / OPTIMIZER))
        save_file(rng, str(tmp / RNG))
        _write_json(tmp / TRAINER_STATE, trainer_state)


def read_training_state(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(trainer_state, optimizer tensors, rng tensors) of a checkpoint; UserError if unusable."""
    for name in (TRAINER_STATE, OPTIMIZER, RNG):
        if not (path / name).is_file():
            raise UserError(f"cannot resume: {name} is missing (not a training checkpoint?)", path=path)
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON: {e.msg}", path=path / TRAINER_STATE, line=e.lineno) from None
    try:
        opt = load_file(str(path / OPTIMIZER))
        rng = load_file(str(path / RNG))
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read resume state: {e}", path=path) from None
    return state, opt, rng


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and leftovers of interrupted writes."""
    root = run_dir / "checkpoints"
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(".step_*"):
        shutil.rmtree(tmp, ignore_errors=True)


def point_last(run_dir: Path, checkpoint: Path) -> None:
    """OUT/last -> the newest checkpoint (a relative symlink, replaced atomically), and
    OUT/last.txt naming it for tools that do not follow links."""
    tmp = run_dir / f".last.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(checkpoint, run_dir), tmp)
    os.replace(tmp, run_dir / "last")
    tmp_txt = run_dir / f".last.txt.{os.getpid()}"
    tmp_txt.write_text(os.path.relpath(checkpoint, run_dir) + "\n", encoding="utf-8")
    os.replace(tmp_txt, run_dir / "last.txt")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
