"""`aiayn ablate` (aiayn.ablate): the rows of Table 3 and the claims as configs and models, the
table it writes, and resuming. Training runs are a few updates of a tiny model on the copy task:
no test asserts what a row learns."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from aiayn.ablate import Row, make_plan, row_config, run_ablation, run_state, select_rows, table3_rows
from aiayn.cli import main
from aiayn.errors import UserError
from aiayn.model import MultiHeadAttention, Transformer, TransformerConfig
from aiayn.train.config import load_raw_config, resolve_config

from helpers import COPY_CONFIG, TINY

# A few updates, a log (and a probe record) at every one, checkpoints every 2.
QUICK = [*TINY, "train.batch_tokens=300", "train.log_every=1", "train.save_every=2", "train.keep_last=5",
         "train.valid_every=0", "train.valid_bleu_sentences=5"]


def expected_parameters(cfg: TransformerConfig) -> int:
    """The model's parameter count from its config, written out (not from the model)."""
    d, ff, inner = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.d_k
    attention_self = d * 3 * inner + 3 * inner + inner * d + d
    attention_cross = d * inner + inner + d * 2 * inner + 2 * inner + inner * d + d
    ffn = d * ff + ff + ff * d + d
    norm = 2 * d
    enc = cfg.n_encoder_layers * (attention_self + ffn + 2 * norm)
    dec = cfg.n_decoder_layers * (attention_self + attention_cross + ffn + 3 * norm)
    embeddings = {"all": 1, "decoder": 2, "none": 3}[cfg.tie_embeddings] * cfg.src_vocab_size * d
    final = 2 * norm if cfg.norm_first else 0
    positions = 2 * cfg.max_positions * d if cfg.positions == "learned" else 0
    return enc + dec + embeddings + final + positions


def changed(base: TransformerConfig, cfg: TransformerConfig) -> set[str]:
    return {k for k, v in cfg.to_dict().items() if base.to_dict()[k] != v}


def small_base():
    return resolve_config(load_raw_config("libreoffice-small", []), 8000)


def test_every_row_builds_the_right_model():
    """At the libreoffice-small base (N 2, d_model 128, d_ff 512, h 4, d_k 32): each row's model
    has the sizes the mapping says, the parameters its config implies, and the option it tests."""
    base = small_base()
    rows = table3_rows(base.model, base.train)
    by_name = {r.name: r for r in rows}
    assert [r.name for r in rows] == [
        "base", "A-h1", "A-h2", "A-h8", "A-h16", "B-dk8", "B-dk16", "C-N1", "C-N3", "C-dmodel64", "C-dmodel256",
        "C-dff256", "C-dff1024", "D-pdrop0", "D-pdrop0.2", "D-ls0", "D-ls0.2", "E-learned", "claims-noscale",
        "claims-noscale-dk128", "claims-dk128", "claims-nopos", "claims-preln", "claims-nols", "claims-untied"]
    assert by_name["claims-dk128"].same_as == "A-h1" and by_name["claims-nols"].same_as == "D-ls0"
    b = base.model
    expected_changes = {
        "A": {"n_heads", "d_k"}, "B": {"d_k"}, "C-N": {"n_encoder_layers", "n_decoder_layers"},
        "C-dmodel": {"d_model", "d_k"}, "C-dff": {"d_ff"}, "D-pdrop": {"dropout"}, "D-ls": set(), "E": {"positions"}}
    for row in rows:
        changes = {k.split(".", 1)[1]: v for k, v in row.changes.items()}
        m = TransformerConfig(**{**b.to_dict(), **{k: v for k, v in changes.items() if k != "label_smoothing"}})
        with torch.device("meta"):
            model = Transformer(m)
        assert model.num_parameters() == expected_parameters(m), row.name
        attentions = [a for a in model.modules() if isinstance(a, MultiHeadAttention)]
        assert all(a.d_k == m.d_k and a.n_heads == m.n_heads for a in attentions)
        assert all(a.scaled == m.attention_scale for a in attentions)
        assert (model.src_embed.positions is None) == (m.positions == "none")
        prefix = next((p for p in sorted(expected_changes, key=len, reverse=True) if row.name.startswith(p)), None)
        if prefix is not None:
            assert changed(b, m) == expected_changes[prefix], row.name
        if row.group == "A":
            assert m.n_heads * m.d_k == b.n_heads * b.d_k  # constant compute
    cfg = {r.name: TransformerConfig(**{**b.to_dict(), **{k.split(".", 1)[1]: v for k, v in r.changes.items()
                                                          if k.startswith("model.")}}) for r in rows}
    assert [cfg[f"A-h{h}"].d_k for h in (1, 2, 8, 16)] == [128, 64, 16, 8]
    assert (cfg["B-dk8"].n_heads, cfg["B-dk16"].n_heads) == (4, 4)
    assert (cfg["C-dmodel64"].d_k, cfg["C-dmodel256"].d_k, cfg["C-dmodel256"].d_ff) == (16, 64, 512)
    assert (cfg["D-pdrop0"].dropout, cfg["D-pdrop0.2"].dropout) == (0.0, 0.2)
    assert by_name["D-ls0.2"].changes == {"train.label_smoothing": 0.2}
    assert not cfg["claims-noscale"].attention_scale and cfg["claims-noscale"].d_k == 32
    big = cfg["claims-noscale-dk128"]
    assert (big.n_heads, big.d_k, big.attention_scale) == (1, 128, False)
    assert cfg["claims-nopos"].positions == "none" and cfg["claims-preln"].norm_first
    assert cfg["claims-untied"].tie_embeddings == "none"
    with torch.device("meta"):
        assert (Transformer(cfg["claims-untied"]).num_parameters()
                == Transformer(b).num_parameters() + 2 * 8000 * 128)


def test_the_paper_base_gives_the_papers_rows_and_parameter_changes():
    """At the paper's base the mapping is Table 3 itself; the (C) rows change the parameters as the
    paper's column does (its counts are rounded to millions, its vocabulary about 37,000)."""
    base = resolve_config(load_raw_config("base", []), 37000)
    rows = {r.name: r for r in table3_rows(base.model, base.train)}
    assert [n for n in rows if n[0] in "ABCDE"] == [
        "A-h1", "A-h4", "A-h16", "A-h32", "B-dk16", "B-dk32", "C-N2", "C-N4", "C-N8", "C-dmodel256", "C-dmodel1024",
        "C-dff1024", "C-dff4096", "D-pdrop0", "D-pdrop0.2", "D-ls0", "D-ls0.2", "E-learned"]
    paper_delta = {"C-N2": 36 - 65, "C-N4": 50 - 65, "C-N8": 80 - 65, "C-dmodel256": 28 - 65,
                   "C-dmodel1024": 168 - 65, "C-dff1024": 53 - 65, "C-dff4096": 90 - 65}
    with torch.device("meta"):
        n0 = Transformer(base.model).num_parameters()
        for name, delta in paper_delta.items():
            m = TransformerConfig(**{**base.model.to_dict(), **{k.split(".", 1)[1]: v
                                                                for k, v in rows[name].changes.items()}})
            assert abs((Transformer(m).num_parameters() - n0) / 1e6 - delta) < 3, name
    assert rows["claims-noscale-dk256"].changes == {"model.n_heads": 2, "model.d_k": 256, "model.attention_scale": False}


def test_row_selection():
    rows = [Row("base", "base", ""), Row("A", "A-h1", ""), Row("claims", "claims-nopos", "")]
    assert [r.name for r in select_rows(rows, "claims")] == ["base", "claims-nopos"]
    with pytest.raises(UserError, match="unknown group 'F'"):
        select_rows(rows, "A,F")


@pytest.fixture(scope="module")
def ablation(small_copy, tmp_path_factory):
    """base (3 seeds) and (E), 4 updates each, on the small copy dataset: (plan, table, train calls)."""
    out = tmp_path_factory.mktemp("ablate") / "out"
    plan = make_plan(COPY_CONFIG, small_copy, out, "E", updates=4, overrides=QUICK)
    table = run_ablation(plan, log=lambda line: None)
    return plan, table


def test_the_plan_gives_the_base_three_seeds_and_every_run_its_row_config(ablation):
    plan, _ = ablation
    assert [r.name for r in plan.rows] == ["base", "E-learned"]
    assert plan.seeds == {"base": [1, 2, 3], "E-learned": [1]}
    for row in plan.rows:
        for seed in plan.seeds[row.name]:
            run = plan.run_dir(row, seed)
            saved = json.loads((run / "result.json").read_text())
            assert saved["seed"] == seed and saved["step"] == 4 and saved["parameters"] > 0
            cfg = row_config(plan, row, seed)
            assert cfg.train.seed == seed and cfg.train.max_updates == 4
            assert cfg.model.positions == ("learned" if row.name == "E-learned" else "sinusoidal")


def test_the_table_is_written(ablation):
    plan, table = ablation
    out = plan.out
    for name in ("table.md", "table.json", "table.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    stored = json.loads((out / "table.json").read_text())
    assert stored == json.loads(json.dumps(table))
    base, learned = stored["rows"]
    assert len(base["seeds"]) == 3 and len(learned["seeds"]) == 1
    assert base["dev_bleu_std"] is not None and learned["dev_bleu_std"] is None
    assert isinstance(learned["dev_bleu_beyond_noise"], bool) and learned["dev_ppl_delta"] is not None
    assert learned["parameters"] == base["parameters"] + 2 * 1024 * 32
    md = (out / "table.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| | row |"))
    for column in ("N", "d_model", "d_ff", "h", "d_k", "d_v", "P_drop", "ε_ls", "dev PPL", "dev BLEU", "params"):
        assert f"| {column} |" in header
    assert "| E | E-learned |" in md and "| base | base |" in md
    assert "positions learned" in md
    # Every run recorded the attention logits at each update (train.log_every=1).
    probe = [json.loads(line) for line in (plan.run_dir(plan.rows[0], 1) / "probe.jsonl").read_text().splitlines()]
    assert [r["step"] for r in probe] == [1, 2, 3, 4]
    assert set(probe[0]["mean"]) == {"enc_self", "dec_self", "cross"}


def test_rerunning_skips_finished_runs_and_resumes_a_half_trained_one(ablation, monkeypatch):
    plan, _ = ablation
    import aiayn.train

    real_train, calls = aiayn.train.train, []

    def counting_train(config, data, out, overrides=(), **kwargs):
        calls.append((out, kwargs))
        return real_train(config, data, out, overrides, **kwargs)

    monkeypatch.setattr(aiayn.train, "train", counting_train)
    results = {p: p.stat().st_mtime_ns for p in plan.out.glob("*/seed*/result.json")}
    assert len(results) == 4
    run_ablation(plan, log=lambda line: None)
    assert calls == []
    assert {p: p.stat().st_mtime_ns for p in results} == results  # not evaluated again

    # seed 2 of the base killed after its checkpoint at update 2: no end record, no later checkpoint.
    run = plan.run_dir(plan.rows[0], 2)
    shutil.rmtree(run / "checkpoints" / "step_0000004")
    (run / "last").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines if json.loads(line)["kind"] != "end"))
    assert run_state(run) == "partial"
    run_ablation(plan, log=lambda line: None)
    assert [(out, kw["resume"]) for out, kw in calls] == [(run, True)]
    assert run_state(run) == "finished"
    probe = [json.loads(line)["step"] for line in (run / "probe.jsonl").read_text().splitlines()]
    assert probe == [1, 2, 3, 4]  # the records after the checkpoint were dropped and made again
    assert json.loads((run / "result.json").read_text())["step"] == 4
    others = {p: t for p, t in results.items() if run not in p.parents}
    assert {p: p.stat().st_mtime_ns for p in others} == others


def test_a_run_directory_of_another_config_is_an_error(ablation):
    plan, _ = ablation
    other = make_plan(COPY_CONFIG, plan.data, plan.out, "E", updates=5, overrides=QUICK)
    with pytest.raises(UserError, match="was trained with another config .*train.max_updates"):
        run_ablation(other, log=lambda line: None)


def test_ctrl_c_prints_the_command_that_continues(small_copy, tmp_path, monkeypatch, capsys):
    import aiayn.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(aiayn.train, "train", interrupted)
    out = tmp_path / "out"
    code = main(["ablate", "--config", str(COPY_CONFIG), "--data", str(small_copy), "--out", str(out),
                 "--rows", "E", "--updates", "3", *QUICK])
    assert code == 130
    err = capsys.readouterr().err
    assert "Continue with:\n  aiayn ablate --config" in err and "--rows E --updates 3 --seeds 1" in err


def test_budget_options_are_checked(small_copy, tmp_path):
    with pytest.raises(UserError, match="--minutes or --updates, not both"):
        make_plan(COPY_CONFIG, small_copy, tmp_path, minutes=1, updates=2)
    with pytest.raises(UserError, match="--seeds must be at least 1"):
        make_plan(COPY_CONFIG, small_copy, tmp_path, seeds=0)
    plan = make_plan(COPY_CONFIG, small_copy, tmp_path, "A", minutes=0.5, seeds=2, overrides=QUICK)
    assert plan.seeds["base"] == [1, 2, 3] and all(len(v) == 2 for k, v in plan.seeds.items() if k != "base")
    assert row_config(plan, plan.rows[1]).train.max_minutes == 0.5

