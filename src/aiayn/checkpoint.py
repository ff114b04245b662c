"""A checkpoint is a directory that holds everything needed to translate with a model:

    model.safetensors   the weights (safetensors: loading never runs code, unlike pickle)
    config.yaml         the TransformerConfig, under the key ``model``
    spm.model           the sentencepiece model the token ids refer to
    meta.json           where it came from (step, the run's and the dataset's directory names,
                        the dataset fingerprint, ...): names only, no local paths; and the
                        search settings recommended for it (``"search"``, a `SearchConfig`)

Training adds its own resume state beside these files (see `aiayn.train`); translation,
evaluation, averaging and inspection need only the four above.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from . import config as config_io
from .config import SearchConfig
from .errors import UserError
from .files import atomic_directory
from .model import Transformer, TransformerConfig

WEIGHTS, CONFIG, TOKENIZER, META = "model.safetensors", "config.yaml", "spm.model", "meta.json"


@dataclass
class Checkpoint:
    model: Transformer
    tokenizer: object  # aiayn.data.Tokenizer
    path: Path
    meta: dict = field(default_factory=dict)

    @property
    def search(self) -> SearchConfig:
        """The search settings recommended for this model (meta.json's ``search``: set by its
        recipe's ``search:`` section or by whoever tuned it), else the paper's."""
        return search_from_meta(self.meta, self.path / META)


def search_from_meta(meta: dict, where: str | Path = META) -> SearchConfig:
    """The `SearchConfig` a checkpoint's meta.json recommends (the paper's where it has none)."""
    recorded = meta.get("search")
    if not isinstance(recorded, dict):
        return SearchConfig()
    return config_io.from_dict(SearchConfig, recorded, f"{where}: search")


def write_checkpoint_files(directory: Path, model: Transformer, tokenizer_file: str | Path, meta: dict | None = None) -> None:
    """Write the four files into an existing (normally temporary) directory."""
    directory = Path(directory)
    # save_model handles tied weights (one tensor under several names) by storing it once.
    save_model(_unwrap(model), str(directory / WEIGHTS))
    config_io.save_yaml({"model": model.config.to_dict()}, directory / CONFIG)
    shutil.copyfile(tokenizer_file, directory / TOKENIZER)
    (directory / META).write_text(json.dumps(meta or {}, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_checkpoint(path: str | Path, model: Transformer, tokenizer_file: str | Path, meta: dict | None = None, *, force: bool = False) -> Path:
    """Write a checkpoint directory atomically: into a temporary sibling, then one rename.
    A crash leaves either the old directory or the new one, never half of one."""
    path = Path(path)
    with atomic_directory(path, kind="checkpoint", force=force) as tmp:
        write_checkpoint_files(tmp, model, tokenizer_file, meta)
    return path


def load_config(path: str | Path) -> TransformerConfig:
    path = Path(path)
    data = config_io.load_yaml(path / CONFIG)
    if "model" not in data:
        raise UserError("no 'model' section", path=path / CONFIG)
    return TransformerConfig.from_dict(data["model"], where=str(path / CONFIG))


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory; every problem is a `UserError` that names the file."""
    from .data import Tokenizer  # the data stage owns the tokenizer

    path = Path(path)
    if not path.is_dir():
        raise UserError("no such checkpoint directory", path=path)
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        if not (path / name).is_file():
            raise UserError(f"not a checkpoint: {name} is missing", path=path)
    model = Transformer(load_config(path))
    try:
        missing, unexpected = load_model(model, str(path / WEIGHTS), strict=False, device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot read weights: {e}", path=path / WEIGHTS) from None
    if missing or unexpected:
        raise UserError(
            f"weights do not match config.yaml (missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})",
            path=path / WEIGHTS,
        )
    meta = read_meta(path)
    try:
        tokenizer = Tokenizer.load(path / TOKENIZER)
    except UserError:
        raise
    except Exception as e:  # sentencepiece raises plain RuntimeError/OSError on a bad file
        raise UserError(f"cannot read the sentencepiece model: {e}", path=path / TOKENIZER) from None
    model.to(device).eval()
    return Checkpoint(model=model, tokenizer=tokenizer, path=path, meta=meta)


def read_meta(path: str | Path) -> dict:
    """A checkpoint's meta.json ({} if it has none); invalid JSON is a UserError naming the line."""
    file = Path(path) / META
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON: {e.msg}", path=file, line=e.lineno) from None


def _unwrap(model: torch.nn.Module) -> Transformer:
    """The Transformer inside a DDP or torch.compile wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
