"""The ``train:`` section of a config file, and how a run's full config is resolved.

A config file (a path, or the name of one shipped with aiayn: ``aiayn/configs/``, linked from
the repository's ``configs/``; see `aiayn.config.find_config`) has up to three sections:

    model:   TransformerConfig fields (``preset: base`` allowed); the vocabulary sizes are
             filled in from the dataset manifest, so they are left out.
    train:   the fields of `TrainConfig` below.
    search:  `SearchConfig` fields: the search recommended for the trained model (the paper's
             beam 4, α 0.6, |x|+50 by default); every checkpoint records it, and translate,
             evaluate, attention and serve use it unless told otherwise.

Any field can be overridden on the command line: ``model.d_model=256 train.max_updates=100``.
An error names the override or the file line that set the offending key (`aiayn.config.blame`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .. import config as config_io
from ..config import ConfigKeyError, SearchConfig
from ..errors import UserError
from ..model import TransformerConfig


@dataclass
class TrainConfig:
    """Every setting of the training recipe (paper §5), with the paper's values as defaults."""

    seed: int = 1
    # -- batches (§5.1): about 25,000 target tokens per update in the paper -------------------
    # Target tokens per *update*, summed over all ranks and accumulated micro-batches. Each rank
    # builds micro-batches of about batch_tokens / (world_size · update_freq) target tokens, so
    # the recipe does not change with the hardware: raise update_freq when memory runs short.
    batch_tokens: int = 25000
    update_freq: int = 1  # micro-batches accumulated per update (gradient accumulation)
    # -- when to stop ---------------------------------------------------------------------------
    max_updates: int = 100000  # 100k for base, 300k for big (§5.2)
    max_epochs: int = 0  # 0: no limit
    max_minutes: float = 0.0  # wall-clock budget of the training loop; 0: no limit
    patience: int = 0  # stop after this many validations without a better BLEU; 0: never
    # -- optimizer and schedule (§5.3) ---------------------------------------------------------
    lr_factor: float = 1.0  # lr = lr_factor · d_model^-0.5 · min(step^-0.5, step · warmup^-1.5)
    warmup: int = 4000
    # The last fraction of the budget (max_updates, or max_minutes when that ends first) over
    # which the rate falls linearly to zero (aiayn.train.schedule); 0: the paper's schedule alone
    cooldown: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    clip_norm: float = 0.0  # max global gradient norm; 0: no clipping (the paper does not clip)
    # -- regularisation (§5.4); dropout is a model field ---------------------------------------
    label_smoothing: float = 0.1
    # -- precision and device -----------------------------------------------------------------
    # auto: bf16 where the device multiplies bf16 natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs),
    # else fp32 (aiayn.precision); bf16/fp16: autocast with fp32 weights; fp16 adds a GradScaler
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # The library of fp32 products on a CPU (aiayn.train.products): auto times MKL against oneDNN
    # on the model's shape at the start and takes oneDNN where it is clearly faster (AMD CPUs,
    # where MKL runs slower code paths); mkl or onednn force one. Not used in bf16 or on GPUs.
    fp32_products: Literal["auto", "mkl", "onednn"] = "auto"
    device: str = "auto"  # auto: cuda (the local rank's GPU) if available, else cpu
    num_threads: int = 0  # CPU threads for torch; 0: torch's default
    max_nonfinite: int = 5  # stop after this many consecutive updates with a non-finite loss
    # -- checkpoints ----------------------------------------------------------------------------
    save_every: int = 1000  # updates between checkpoints (one is always written at the end)
    # Wall-clock minutes between checkpoints; > 0 replaces save_every. Under a time budget
    # (max_minutes) this is the cadence to use: with an update cadence, a slower machine makes
    # fewer checkpoints, and the last average_last of them reach back to early, weak models.
    save_every_minutes: float = 0.0
    keep_last: int = 5  # checkpoints kept in OUT/checkpoints (older ones are deleted)
    average_last: int = 5  # at the end, average the last N checkpoints into OUT/averaged; <2: off
    # -- validation -----------------------------------------------------------------------------
    valid_every: int = 1000  # updates between validations (and one at the end); 0: only at the end
    valid_every_minutes: float = 0.0  # wall-clock minutes between validations; > 0 replaces valid_every
    valid_batch_tokens: int = 8000
    valid_bleu_sentences: int = 0  # greedy-decode the first N valid sentences for BLEU; 0: all
    valid_max_len_a: float = 1.0  # greedy output length limit a·|x| + b
    valid_max_len_b: int = 50
    # -- logging --------------------------------------------------------------------------------
    log_every: int = 100  # updates between lines of metrics.jsonl / TensorBoard points
    progress: bool = True  # progress display (rank 0): a bar on a terminal, plain lines in a log

    def __post_init__(self) -> None:
        positive = ("batch_tokens", "update_freq", "max_updates", "warmup", "save_every", "keep_last",
                    "valid_batch_tokens", "log_every", "max_nonfinite")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("max_epochs", "max_minutes", "save_every_minutes", "valid_every_minutes", "patience", "clip_norm", "valid_every",
                     "valid_bleu_sentences", "num_threads", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not 0.0 <= self.cooldown <= 1.0:
            raise ValueError("cooldown must be in [0, 1] (a fraction of the budget)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1)")
        if not (0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0):
            raise ValueError("Adam betas must be in [0, 1)")
        if self.average_last > self.keep_last:
            raise ValueError(f"average_last ({self.average_last}) needs keep_last >= it ({self.keep_last})")


@dataclass
class RunConfig:
    """The resolved config of a run, as written to OUT/config.yaml."""

    model: TransformerConfig
    train: TrainConfig
    search: SearchConfig = SearchConfig()

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": config_io.to_dict(self.train),
                "search": config_io.to_dict(self.search)}

    def digest(self) -> str:
        """Identifies what is trained (model and train sections): the search section, which
        only says how the result is best translated, may change between runs and resumes."""
        trained = {"model": self.model.to_dict(), "train": config_io.to_dict(self.train)}
        return hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()[:16]


SECTIONS = ("model", "train", "search")


def resolve_config(raw: dict[str, Any], vocab_size: int | tuple[int, int], where: str = "config") -> RunConfig:
    """A config mapping (file + overrides) -> RunConfig, vocabulary sizes from the dataset.

    The datasets of `aiayn prepare` have one joint BPE vocabulary (§5.1), so source and
    target share ``vocab_size``; a dataset encoded with an imported model's separate
    vocabularies gives (source size, target size). A config that names a different size is an
    error. Errors name
    the override or the file line that set the key (``raw`` from `load_raw_config`), else
    ``where``.
    """
    with config_io.blamed(raw, where):
        for section in raw:
            if section not in SECTIONS:
                message = config_io.unknown_key_message(section, SECTIONS, "section")
                raise ConfigKeyError(f"{message} (a config has model:, train: and search:)", [(str(section),)])
        sections = {}
        for section in SECTIONS:
            value = raw.get(section) or {}
            if not isinstance(value, dict):
                raise ConfigKeyError(f"{section}: expected a mapping of settings, got {value!r}", [(section,)])
            sections[section] = dict(value)
        model = sections["model"]
        sizes = vocab_size if isinstance(vocab_size, tuple) else (vocab_size, vocab_size)
        for key, size in zip(("src_vocab_size", "tgt_vocab_size"), sizes):
            if model.get(key) not in (None, size):
                raise ConfigKeyError(f"model.{key}={model[key]} but the dataset's vocabulary has {size} "
                                     "entries; leave vocabulary sizes out of the config", [("model", key)])
            model[key] = size
        model_cfg = TransformerConfig.from_dict(model, where="model")
        train_cfg = config_io.from_dict(TrainConfig, sections["train"], where="train")
        search_cfg = config_io.from_dict(SearchConfig, sections["search"], where="search")
        try:
            search_cfg.check()
        except ConfigKeyError:
            raise
        except UserError as e:
            fields = config_io.mentioned_fields(str(e), SearchConfig.__dataclass_fields__)
            raise ConfigKeyError(f"search: {e}", [("search", k) for k in fields] or [("search",)]) from None
    return RunConfig(model=model_cfg, train=train_cfg, search=search_cfg)


def load_raw_config(path: str | Path, overrides: list[str]) -> config_io.ConfigDict:
    """The mapping of a config file (a path, or a shipped config's name: `aiayn.config.find_config`)
    with ``section.key=value`` overrides applied; it remembers where each key was set."""
    raw = config_io.load_yaml(config_io.find_config(path))
    for item in overrides:
        if "=" in item and item.split("=", 1)[0].split(".", 1)[0] not in SECTIONS:
            raise UserError(f"override {item!r}: keys start with 'model.', 'train.' or 'search.'")
    return config_io.apply_overrides(raw, overrides)


# What a fine-tuning run may set differently from the checkpoint it starts from: regularisation,
# not architecture.
FINE_TUNING_MAY_CHANGE = ("dropout", "attention_dropout", "activation_dropout", "source_word_dropout",
                          "target_word_dropout")


def init_from_checkpoint(raw: dict[str, Any], checkpoint: str | Path, dataset, where: str = "config") -> dict[str, Any]:
    """The raw config of a run that starts from ``checkpoint`` (``aiayn train --init``): its
    ``model`` section is the checkpoint's, where the config's own says nothing else; a key the
    config sets to another value is an error naming it, except the dropout rates
    (`FINE_TUNING_MAY_CHANGE`). The dataset must be encoded with the checkpoint's tokenizer."""
    from ..checkpoint import check_checkpoint_dir, load_config
    from ..data.tokenizer import load_tokenizer
    from ..model import PRESETS

    path = check_checkpoint_dir(checkpoint)
    if load_tokenizer(path).sha256 != dataset.tokenizer.sha256:
        raise UserError(f"the dataset {dataset.path} is not encoded with this checkpoint's tokenizer; prepare it "
                        f"with aiayn prepare --tokenizer-from {path} ...", path=path)
    theirs = load_config(path).to_dict()
    ours = dict(raw.get("model") or {})
    if "preset" in ours:
        ours = {**PRESETS.get(ours.pop("preset"), {}), **ours}
    with config_io.blamed(raw, where):
        for key, value in ours.items():
            if key in FINE_TUNING_MAY_CHANGE or key in ("src_vocab_size", "tgt_vocab_size"):
                continue
            if key in theirs and theirs[key] != value:
                raise ConfigKeyError(f"model.{key} is {value!r} but the checkpoint's is {theirs[key]!r}: a run "
                                     "with --init takes the checkpoint's architecture (drop the key, or set it to "
                                     "match)", [("model", key)])
    raw["model"] = {**theirs, **{k: ours[k] for k in FINE_TUNING_MAY_CHANGE if k in ours}}
    return raw
