"""The train: section and config resolution (aiayn.train.config), and every shipped config."""

from __future__ import annotations

import pytest

from aiayn.errors import UserError
from aiayn.train import TrainConfig, resolve_config
from aiayn.train.config import load_raw_config

from helpers import REPO


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
    with pytest.raises(UserError, match=r"override 'train.cooldown=1.5': .*cooldown must be in \[0, 1\]"):
        resolve_config(load_raw_config(REPO / "configs/copy.yaml", ["train.cooldown=1.5"]), vocab_size=45)
    assert TrainConfig().cooldown == 0.0  # the paper's schedule alone unless asked
    assert TrainConfig().warmup == 4000 and TrainConfig().label_smoothing == 0.1
    base = resolve_config(load_raw_config(REPO / "configs/base.yaml", []), vocab_size=37000)
    assert (base.model.d_model, base.model.n_heads, base.model.dropout) == (512, 8, 0.1)
    assert (base.train.batch_tokens, base.train.max_updates, base.train.average_last) == (25000, 100000, 5)
    big = resolve_config(load_raw_config(REPO / "configs/big.yaml", []), vocab_size=37000)
    assert (big.model.d_model, big.model.dropout, big.train.max_updates, big.train.average_last) == (1024, 0.3, 300000, 20)
