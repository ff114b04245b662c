"""A checkpoint is a directory that holds everything needed to translate with a model:

    model.safetensors   the weights (safetensors: loading never runs code, unlike pickle)
    config.yaml         the TransformerConfig, under the key ``model``
    spm.model           the sentencepiece model the token ids refer to (an imported Marian
                        model has its pair instead: source.spm, target.spm, vocab.json;
                        `aiayn.data.tokenizer.load_tokenizer`)
    meta.json           where it came from (step, the run's and the dataset's directory names,
                        the dataset fingerprint, ...): names only, no local paths; and the
                        search settings recommended for it (``"search"``, a `SearchConfig`)

Training adds its own resume state beside these files (see `aiayn.train`); translation,
evaluation, averaging and inspection need only the four above.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from . import config as config_io
from .config import SearchConfig
from .data.tokenizer import tokenizer_files
from .errors import UserError
from .files import ARTEFACTS, artefact_kind, atomic_directory
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


def write_checkpoint_files(directory: Path, model: Transformer, tokenizer, meta: dict | None = None) -> None:
    """Write the four files (the tokenizer's own: ``tokenizer.save``) into an existing
    (normally temporary) directory. ``tokenizer``: a tokenizer (`aiayn.data.tokenizer`), or the
    path of an aiayn spm.model."""
    directory = Path(directory)
    # save_model handles tied weights (one tensor under several names) by storing it once.
    save_model(_unwrap(model), str(directory / WEIGHTS))
    config_io.save_yaml({"model": model.config.to_dict()}, directory / CONFIG)
    if isinstance(tokenizer, (str, Path)):
        from .data.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(tokenizer)
    tokenizer.save(directory)
    (directory / META).write_text(json.dumps(meta or {}, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_checkpoint(path: str | Path, model: Transformer, tokenizer, meta: dict | None = None, *, force: bool = False) -> Path:
    """Write a checkpoint directory atomically: into a temporary sibling, then one rename.
    A crash leaves either the old directory or the new one, never half of one."""
    path = Path(path)
    with atomic_directory(path, kind="checkpoint", force=force) as tmp:
        write_checkpoint_files(tmp, model, tokenizer, meta)
    return path


def load_config(path: str | Path) -> TransformerConfig:
    """A checkpoint's TransformerConfig (its config.yaml); errors name the file and line."""
    path = Path(path)
    data = config_io.load_yaml(path / CONFIG)
    if not isinstance(data.get("model"), dict):
        raise UserError("no 'model' section", path=path / CONFIG)
    with config_io.blamed(data, path / CONFIG):
        return TransformerConfig.from_dict(data["model"], where="model")


# A run's checkpoints that translate, evaluate and serve take, the usual choice first (aiayn.train.trainer).
RUN_CHECKPOINTS = ("averaged", "best", "last")


def _suggest_in_run(run: Path) -> str:
    """'runs/copy/averaged or runs/copy/last': the checkpoints of a run directory that exist."""
    found = [str(run / name) for name in RUN_CHECKPOINTS if artefact_kind(run / name) == "checkpoint"]
    return " or ".join(found) if found else "none yet: it has not written a checkpoint"


def check_checkpoint_dir(path: str | Path) -> Path:
    """``path`` if it looks like a checkpoint directory; else a `UserError` that says what it
    is and, for a training run (or a path inside one), which of its checkpoints to give."""
    path = Path(path)
    if not path.is_dir():
        if artefact_kind(path.parent) == "run":
            raise UserError(f"no such checkpoint directory; the run {path.parent} has {_suggest_in_run(path.parent)}",
                            path=path)
        raise UserError("no such checkpoint directory" if not path.exists() else "not a checkpoint directory",
                        path=path)
    kind = artefact_kind(path)
    if kind == "run":
        raise UserError(f"is {ARTEFACTS['run']}, not a checkpoint; give one of its checkpoints: "
                        f"{_suggest_in_run(path)}", path=path)
    if kind in ("dataset", "export", "attention"):
        raise UserError(f"is {ARTEFACTS[kind]}, not a checkpoint; a checkpoint is what aiayn train writes "
                        "(RUN/averaged, or RUN/last)", path=path)
    for name in (WEIGHTS, CONFIG):
        if not (path / name).is_file():
            raise UserError(f"not a checkpoint: {name} is missing", path=path)
    if tokenizer_files(path) is None:
        raise UserError(f"not a checkpoint: {TOKENIZER} is missing", path=path)
    return path


def read_weights(model: Transformer, file: Path) -> None:
    try:
        missing, unexpected = load_model(model, str(file), strict=False, device="cpu")
    except SafetensorError as e:
        # a short file ("incomplete metadata", "invalid header length"), or bytes that are no safetensors
        raise UserError(f"the weights file is truncated or corrupt ({file.stat().st_size} bytes; safetensors: {e}); "
                        "copy or write the checkpoint again", path=file) from None
    except RuntimeError as e:
        if "size mismatch" in str(e):
            raise UserError(f"weights do not match config.yaml ({str(e).strip().splitlines()[-1].strip()})",
                            path=file) from None
        raise UserError(f"cannot read weights: {e}", path=file) from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read weights: {e}", path=file) from None
    if missing or unexpected:
        raise UserError(
            f"weights do not match config.yaml (missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]})",
            path=file,
        )


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory; every problem is a `UserError` that names the file (and
    for a training run or a dataset given instead, says so and which checkpoint to give)."""
    from .data.tokenizer import load_tokenizer  # the data stage owns the tokenizer

    path = check_checkpoint_dir(path)
    model = Transformer(load_config(path))
    read_weights(model, path / WEIGHTS)
    meta = read_meta(path)
    try:
        tokenizer = load_tokenizer(path)
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
