"""``aiayn ablate``: the paper's Table 3, and its claims, as training runs of one base config.

Every row is a variation of the base config (``--config``, with its overrides): the paper's
*relative* changes applied to the base's sizes, so that the table runs at the scale of the base
(a CPU config such as ``libreoffice-small``). Each row and seed trains with the same budget
(``--minutes`` or ``--updates``, else the base config's own) through `aiayn.train.train` into
``OUT/<row>/seed<k>/``, and is then evaluated on the dataset's valid split: perplexity
(teacher-forced, no label smoothing) and BLEU of beam search with beam 4 (the paper's; α and the
length limit are the base config's ``search:`` section), as in the paper's Table 3 without
checkpoint averaging ("We used beam search as described in the previous section, but no
checkpoint averaging"): the run's final checkpoint, ``OUT/<row>/seed<k>/last``.

The mapping of the paper's values (base: N 6, d_model 512, d_ff 2048, h 8, d_k = d_v 64, P_drop
0.1, ε_ls 0.1) to a base config's (N, d_model, d_ff, h, d_k, P, ε):

    (A) h ∈ {1, 4, 16, 32}, d_k = d_v = 512/h     h' ∈ {1, h/2, 2h, 4h}, d_k' = h·d_k/h' (constant compute)
    (B) d_k ∈ {16, 32}, h 8                        d_k' ∈ {d_k/4, d_k/2}, h fixed; d_v follows d_k here
                                                   (aiayn has one per-head size: the paper kept d_v 64)
    (C) N ∈ {2, 4, 8}                              N' = round(N·{1/3, 2/3, 4/3}) (at least 1; duplicates
                                                   and N itself dropped: N 2 gives 1 and 3)
        d_model ∈ {256, 1024}, d_k = d_v 32, 128   d_model' ∈ {d_model/2, 2·d_model}, d_k' = d_k·(same
                                                   factor), h and d_ff fixed (as the paper's 28M/168M)
        d_ff ∈ {1024, 4096}                        d_ff' ∈ {d_ff/2, 2·d_ff}
    (D) P_drop ∈ {0.0, 0.2}                        P' ∈ {0, 2P} (a base P of 0: the paper's 0.1, 0.2)
        ε_ls ∈ {0.0, 0.2}                          ε' ∈ {0, 2ε} (a base ε of 0: the paper's 0.1, 0.2)
    (E) learned positional embeddings              positions: learned (sinusoidal if the base learns them)

The claims rows test what the paper says without a row of Table 3:

    noscale           §3.2.1 "we suspect that for large values of d_k, the dot products grow large
                      in magnitude, pushing the softmax function into regions where it has
                      extremely small gradients": attention without 1/√d_k (attention_scale false)
    noscale-dk<D>     the same at a larger d_k, where the claim says it matters most: h/4 heads of
                      d_k ×4 (constant compute; h < 4: one head of h·d_k)
    dk<D>             its control: the same heads with the scale (often an (A) row: then that run)
    nopos             §3.5: no positional encoding at all (positions none)
    preln / postln    §3.1's post-LN against pre-LN (whichever the base is not)
    nols              §5.4 label smoothing off (often (D)'s ε 0 row: then that run)
    untied            §3.4's shared embeddings untied (tie_embeddings none)

A row whose config equals an earlier row's (the control above, ``nols``) is the same run
(``same_as``): trained once, in the earlier row's directory, and shown in both places.

Every row records, at each of its log steps (``train.log_every``), statistics of the attention
logits in ``probe.jsonl`` beside ``metrics.jsonl`` (`AttentionProbe`): per attention (encoder
self, decoder self, encoder-decoder; per layer) the norm of the gradient of the update's loss
with respect to the pre-softmax logits, the softmax's saturation (the mean over query rows of the
largest probability) and the logits' standard deviation. Only the update at a log step is
observed (through the explicit attention path), so that every row pays the same small cost.

Seeds: every row trains ``--seeds`` seeds (``train.seed`` = the base's seed + 0, 1, ...); the base
row at least 3, so that the table can say which differences exceed the base's seed spread: a
mean more than 2 standard deviations (of the base's seeds) from the base's mean.

Resume: a row+seed whose ``metrics.jsonl`` ends with an ``end`` record that is not an interruption
is finished and kept; one with a checkpoint resumes exactly (`aiayn.train`'s resume); its
evaluation is cached in ``result.json``. A run directory trained with another config (another
budget, other overrides) is an error, never silently mixed into the table.

Outputs: ``OUT/table.md``, ``OUT/table.json``, ``OUT/table.png`` (BLEU and perplexity per row,
each seed a dot) and ``OUT/claims.png`` (the claims rows' training curves and probe statistics),
rewritten after every evaluated run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

GROUPS = ("A", "B", "C", "D", "E", "claims")
BASE_SEEDS = 3  # the base row's seeds at least: the noise the other rows are judged against
EVAL_BEAM = 4  # the paper's beam (§6.1); Table 3 used it too
EVAL_PRECISION = "fp32"  # evaluation arithmetic, the same for every row
NOISE_SIGMAS = 2.0  # a difference "exceeds the noise" beyond this many of the base's seed std
PROBE_FILE, RESULT_FILE = "probe.jsonl", "result.json"

# The paper's base (Table 3's first row), for the "paper" column.
PAPER = dict(N=6, d_model=512, d_ff=2048, h=8, d_k=64, p_drop=0.1, eps_ls=0.1)


# ---------------------------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One row of the table: its group, its name (also its directory), what the paper's row says,
    and the changes to the base config it maps to (``changes``: {"model.n_heads": 1, ...})."""

    group: str  # "base", "A" .. "E", "claims"
    name: str
    paper: str  # the paper's row, or the claim
    changes: dict[str, Any] = field(default_factory=dict)
    same_as: str | None = None  # an earlier row with the same config: its run is this row's

    @property
    def run_name(self) -> str:
        """The directory the row trains in (its own, or that of the row it is the same as)."""
        return self.same_as or self.name

    def overrides(self) -> list[str]:
        """The changes as ``section.key=value`` overrides (values as YAML)."""
        return [f"{key}={_yaml_value(value)}" for key, value in self.changes.items()]


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _num(x: float) -> str:
    return f"{x:g}"


def table3_rows(model, train) -> list[Row]:
    """Every row for a base config (``model``: its `TransformerConfig`, ``train``: its
    `TrainConfig`), the base first, Table 3's groups in order, then the claims (see the module
    docstring for the mapping). Rows whose config equals an earlier row's get ``same_as``."""
    h, d_k, d_model, d_ff = model.n_heads, model.d_k, model.d_model, model.d_ff
    inner = h * d_k
    n_enc, n_dec = model.n_encoder_layers, model.n_decoder_layers
    rows = [Row("base", "base", "base: N 6, d_model 512, d_ff 2048, h 8, d_k = d_v 64, P_drop 0.1, ε_ls 0.1")]

    # (A) the number of heads at constant compute: the paper's 1, 4, 16, 32 of 8.
    for paper_h, h2 in ((1, 1), (4, h // 2 if h % 2 == 0 else 0), (16, 2 * h), (32, 4 * h)):
        if h2 < 1 or h2 == h or inner % h2:
            continue
        rows.append(Row("A", f"A-h{h2}", f"h {paper_h}, d_k = d_v {512 // paper_h}",
                        {"model.n_heads": h2, "model.d_k": inner // h2}))
    # (B) smaller keys, h fixed: the paper's d_k 16 and 32 of 64.
    for paper_dk, div in ((16, 4), (32, 2)):
        if d_k % div == 0 and d_k // div >= 1:
            rows.append(Row("B", f"B-dk{d_k // div}", f"d_k {paper_dk} (d_v 64)", {"model.d_k": d_k // div}))
    # (C) depth: the paper's 2, 4, 8 of 6 layers.
    seen = {(n_enc, n_dec)}
    for paper_n, factor in ((2, 1 / 3), (4, 2 / 3), (8, 4 / 3)):
        e, d = max(1, round(n_enc * factor)), max(1, round(n_dec * factor))
        if (e, d) in seen:
            continue
        seen.add((e, d))
        rows.append(Row("C", f"C-N{e}" if e == d else f"C-N{e}+{d}", f"N {paper_n}",
                        {"model.n_encoder_layers": e, "model.n_decoder_layers": d}))
    # (C) width: d_model 256 and 1024 of 512 with d_k following (h and d_ff fixed), d_ff 1024 and 4096.
    for paper_d, factor in ((256, 0.5), (1024, 2.0)):
        d2, dk2 = d_model * factor, d_k * factor
        if d2 == int(d2) and dk2 == int(dk2) and dk2 >= 1:
            rows.append(Row("C", f"C-dmodel{int(d2)}", f"d_model {paper_d}, d_k = d_v {paper_d // 8}",
                            {"model.d_model": int(d2), "model.d_k": int(dk2)}))
    for paper_ff, factor in ((1024, 0.5), (4096, 2.0)):
        ff2 = d_ff * factor
        if ff2 == int(ff2) and ff2 >= 1:
            rows.append(Row("C", f"C-dff{int(ff2)}", f"d_ff {paper_ff}", {"model.d_ff": int(ff2)}))
    # (D) regularisation: P_drop and ε_ls 0.0 and 0.2 of 0.1.
    for key, label, name, base in (("model.dropout", "P_drop", "pdrop", model.dropout),
                                   ("train.label_smoothing", "ε_ls", "ls", train.label_smoothing)):
        values = (0.0, 2 * base) if base > 0 else (0.1, 0.2)
        for paper_v, v in zip((0.0, 0.2), values):
            v = round(v, 6)
            if v != base and 0.0 <= v < 1.0:
                rows.append(Row("D", f"D-{name}{_num(v)}", f"{label} {_num(paper_v)}", {key: v}))
    # (E) the other kind of positions.
    other = "learned" if model.positions == "sinusoidal" else "sinusoidal"
    rows.append(Row("E", f"E-{other}", "positional embedding instead of sinusoids", {"model.positions": other}))

    # The claims.
    scale = not model.attention_scale
    what = "without" if model.attention_scale else "with"
    rows.append(Row("claims", "claims-noscale" if model.attention_scale else "claims-scale",
                    f"§3.2.1: attention {what} 1/√d_k", {"model.attention_scale": scale}))
    if h >= 4 and h % 4 == 0:
        h_big, dk_big = h // 4, 4 * d_k
    elif h > 1:
        h_big, dk_big = 1, inner
    else:
        h_big, dk_big = 1, 4 * d_k
    big = {"model.n_heads": h_big, "model.d_k": dk_big}
    rows.append(Row("claims", f"claims-{'noscale' if model.attention_scale else 'scale'}-dk{dk_big}",
                    f"§3.2.1: attention {what} 1/√d_k at d_k {dk_big} ({h_big} head{'s' * (h_big > 1)})",
                    {**big, "model.attention_scale": scale}))
    rows.append(Row("claims", f"claims-dk{dk_big}", f"the control: d_k {dk_big} ({h_big} head{'s' * (h_big > 1)}) "
                    f"{'with' if model.attention_scale else 'without'} 1/√d_k", big))
    if model.positions != "none":
        rows.append(Row("claims", "claims-nopos", "§3.5: no positional encoding", {"model.positions": "none"}))
    rows.append(Row("claims", "claims-postln" if model.norm_first else "claims-preln",
                    "§3.1: post-LN" if model.norm_first else "pre-LN instead of §3.1's post-LN",
                    {"model.norm_first": not model.norm_first}))
    if train.label_smoothing > 0:
        rows.append(Row("claims", "claims-nols", "§5.4: no label smoothing", {"train.label_smoothing": 0.0}))
    if model.tie_embeddings != "none":
        rows.append(Row("claims", "claims-untied", "§3.4: untied embeddings", {"model.tie_embeddings": "none"}))
    elif model.src_vocab_size == model.tgt_vocab_size:
        rows.append(Row("claims", "claims-tied", "§3.4: tied embeddings", {"model.tie_embeddings": "all"}))
    return _mark_duplicates(rows, model, train)


def _effective(row: Row, model, train) -> tuple:
    """The config a row trains, as a comparable value."""
    sections = {"model": dataclasses.asdict(model), "train": dataclasses.asdict(train)}
    for key, value in row.changes.items():
        section, name = key.split(".", 1)
        sections[section][name] = value
    return tuple(sorted((s, tuple(sorted(v.items()))) for s, v in sections.items()))


def _mark_duplicates(rows: list[Row], model, train) -> list[Row]:
    first: dict[tuple, str] = {}
    out = []
    for row in rows:
        key = _effective(row, model, train)
        if key in first:
            row = dataclasses.replace(row, same_as=first[key])
        else:
            first[key] = row.name
        out.append(row)
    return out


def select_rows(rows: Sequence[Row], groups: str | Sequence[str]) -> list[Row]:
    """The base row and the rows of ``groups`` ("A,B,claims" or a list)."""
    wanted = [g.strip() for g in groups.split(",")] if isinstance(groups, str) else list(groups)
    wanted = [g for g in wanted if g]
    for g in wanted:
        if g not in GROUPS:
            raise UserError(f"--rows: unknown group {g!r}; the groups are {', '.join(GROUPS)}")
    return [r for r in rows if r.group == "base" or r.group in wanted]


# ---------------------------------------------------------------------------------------------
# The probe of the attention logits
# ---------------------------------------------------------------------------------------------


class AttentionProbe:
    """Statistics of every attention's logits, at every ``every``-th update, into ``path``.

    Installed for one training run (``with probe:``): it sets `MultiHeadAttention.probe` (class
    wide) and two global hooks of torch, one that names the attention modules as the encoder and
    decoder stacks run (``enc_self.i``, ``dec_self.i``, ``cross.i``) and one after every optimizer
    step, which counts the updates (the trainer steps the optimizer once per applied update, so
    the count is its update count; ``start_step`` after a resume). Only the update whose number is
    a multiple of ``every`` is observed: the attention modules then take the explicit path and
    report the logits (the softmax's input) and the probabilities, and a tensor hook on the
    logits receives d loss / d logits in the backward pass. After that update one JSON line is
    appended: for each attention, ``grad_norm`` (the L2 norm of that gradient over the update's
    micro-batches: the update's loss is the token-normalised sum, so it is the gradient of the
    loss that is trained), ``saturation`` (the mean over query rows of the largest probability;
    padded query rows included) and ``logit_std`` (over every query-key pair of the batch), and
    their means per kind (``mean``).
    """

    def __init__(self, path: Path, every: int, start_step: int = 0):
        self.path, self.every, self.step = Path(path), max(1, every), start_step
        self.active = (start_step + 1) % self.every == 0
        self.names: dict[int, str] = {}
        self._stats: dict[str, list[float]] = {}
        self._handles: list = []
        self._naming = None
        self._named: set[str] = set()

    # -- installation --------------------------------------------------------------------------
    def __enter__(self) -> AttentionProbe:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        from .model import MultiHeadAttention

        if MultiHeadAttention.probe is not None:
            raise RuntimeError("another attention probe is installed")
        MultiHeadAttention.probe = self
        self._naming = torch.nn.modules.module.register_module_forward_pre_hook(self._name_layers)
        self._handles = [self._naming, register_optimizer_step_post_hook(self._after_step)]
        return self

    def __exit__(self, *exc) -> None:
        from .model import MultiHeadAttention

        for handle in self._handles:
            handle.remove()
        self._handles = []
        MultiHeadAttention.probe = None

    def _name_layers(self, module, args) -> None:
        """A global forward pre-hook until both stacks are named (it slows every module call)."""
        from .model import Decoder, Encoder

        if isinstance(module, Encoder):
            for i, layer in enumerate(module.layers):
                self.names[id(layer.self_attn)] = f"enc_self.{i}"
            self._named.add("encoder")
        elif isinstance(module, Decoder):
            for i, layer in enumerate(module.layers):
                self.names[id(layer.self_attn)] = f"dec_self.{i}"
                self.names[id(layer.cross_attn)] = f"cross.{i}"
            self._named.add("decoder")
        if len(self._named) == 2 and self._naming is not None:
            self._naming.remove()
            self._naming = None

    # -- observation ---------------------------------------------------------------------------
    def observer(self, module) -> Callable | None:
        """What `MultiHeadAttention` calls with (logits, probs) on an observed update."""
        import torch

        if not torch.is_grad_enabled():
            return None
        name = self.names.get(id(module), f"attention.{id(module)}")
        stats = self._stats.setdefault(name, [0.0] * 6)  # grad², Σ max p, rows, Σ x, Σ x², n

        def observe(logits, probs) -> None:
            with torch.no_grad():
                top = probs.detach().amax(dim=-1)
                x = logits.detach().float()
                stats[1] += float(top.sum())
                stats[2] += top.numel()
                stats[3] += float(x.sum())
                stats[4] += float(x.pow(2).sum())
                stats[5] += x.numel()
            if logits.requires_grad:
                logits.register_hook(lambda g: stats.__setitem__(0, stats[0] + float(g.detach().float().pow(2).sum())))

        return observe

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.step += 1
        if self.active and self._stats:
            self._write()
        self._stats = {}
        self.active = (self.step + 1) % self.every == 0

    def _write(self) -> None:
        layers = {}
        for name, (g2, top, rows, xs, xs2, n) in sorted(self._stats.items()):
            mean = xs / max(n, 1)
            layers[name] = {"grad_norm": math.sqrt(g2), "saturation": top / max(rows, 1),
                            "logit_std": math.sqrt(max(xs2 / max(n, 1) - mean * mean, 0.0))}
        kinds: dict[str, dict[str, list[float]]] = {}
        for name, values in layers.items():
            for key, value in values.items():
                kinds.setdefault(name.split(".")[0], {}).setdefault(key, []).append(value)
        mean = {kind: {k: sum(v) / len(v) for k, v in values.items()} for kind, values in kinds.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": self.step, "mean": mean, "layers": layers}) + "\n")


# ---------------------------------------------------------------------------------------------
# Running the rows
# ---------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What an ablation trains: the rows, each row's seeds and the overrides every run gets."""

    config: str
    data: Path
    out: Path
    rows: list[Row]
    seeds: dict[str, list[int]]  # row name -> train.seed values
    common: list[str]  # the user's overrides and the budget, before each row's own
    budget: str
    vocab: tuple[int, int]  # the dataset's (source, target) vocabulary sizes
    base_model: Any = None
    base_train: Any = None

    def overrides(self, row: Row, seed: int) -> list[str]:
        return [*self.common, *row.overrides(), f"train.seed={seed}"]

    def run_dir(self, row: Row, seed: int) -> Path:
        return self.out / row.run_name / f"seed{seed}"


def budget_overrides(minutes: float | None, updates: int | None) -> tuple[list[str], str]:
    """The overrides of ``--minutes`` / ``--updates`` and a description of the budget."""
    if minutes is not None and updates is not None:
        raise UserError("give --minutes or --updates, not both")
    if minutes is not None:
        if minutes <= 0:
            raise UserError(f"--minutes must be positive (got {minutes:g})")
        return [f"train.max_minutes={minutes:g}"], f"{minutes:g} minutes"
    if updates is not None:
        if updates < 1:
            raise UserError(f"--updates must be at least 1 (got {updates})")
        return [f"train.max_updates={updates}", "train.max_minutes=0"], f"{updates} updates"
    return [], "the base config's"


def make_plan(config: str | Path, data: str | Path, out: str | Path, groups: str | Sequence[str] = ",".join(GROUPS),
              *, minutes: float | None = None, updates: int | None = None, seeds: int = 1,
              overrides: Sequence[str] = ()) -> Plan:
    """Resolve the base config on the dataset and list the rows and seeds to train."""
    from .data import load_dataset
    from .train.config import load_raw_config, resolve_config

    if seeds < 1:
        raise UserError(f"--seeds must be at least 1 (got {seeds})")
    budget, described = budget_overrides(minutes, updates)
    common = [*overrides, *budget]
    tok = load_dataset(data).tokenizer
    base = resolve_config(load_raw_config(config, common), (tok.src_vocab_size, tok.vocab_size), where=str(config))
    rows = select_rows(table3_rows(base.model, base.train), groups)
    first = base.train.seed
    seed_map = {r.name: list(range(first, first + (max(BASE_SEEDS, seeds) if r.group == "base" else seeds)))
                for r in rows}
    if budget == [] and base.train.max_minutes <= 0:
        described = f"{base.train.max_updates} updates (the base config's)"
    elif budget == []:
        described = f"{base.train.max_minutes:g} minutes (the base config's)"
    return Plan(str(config), Path(data), Path(out), rows, seed_map, common, described,
                (tok.src_vocab_size, tok.vocab_size), base.model, base.train)


def row_config(plan: Plan, row: Row, seed: int | None = None):
    """The resolved `RunConfig` a row trains (``seed``: its train.seed; None: the first)."""
    from .train.config import load_raw_config, resolve_config

    seed = plan.seeds.get(row.name, [plan.base_train.seed])[0] if seed is None else seed
    raw = load_raw_config(plan.config, plan.overrides(row, seed))
    return resolve_config(raw, plan.vocab, where=plan.config)


def run_state(run: Path) -> str:
    """'finished', 'partial' (a checkpoint to resume from), 'empty' (nothing to resume) or 'new'."""
    from .train.state import list_checkpoints

    if not run.exists():
        return "new"
    log = run / "metrics.jsonl"
    if log.is_file():
        lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
        try:
            last = json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            last = {}
        if last.get("kind") == "end" and last.get("reason") != "interrupted" and list_checkpoints(run):
            return "finished"
    return "partial" if list_checkpoints(run) else "empty"


def _check_same_config(run: Path, cfg) -> None:
    """A run directory trained with another config is an error (another budget, other overrides)."""
    import yaml

    saved_file = run / "config.yaml"
    if not saved_file.is_file():
        return
    saved = yaml.safe_load(saved_file.read_text(encoding="utf-8")) or {}
    want = cfg.to_dict()
    differs = [f"{section}.{key}" for section in ("model", "train")
               for key in sorted(set(want[section]) | set(saved.get(section) or {}))
               if (saved.get(section) or {}).get(key) != want[section].get(key)]
    if differs:
        raise UserError(f"was trained with another config ({', '.join(differs[:6])} differ); give another --out, "
                        "or delete the directory to train it again", path=run)


def train_run(plan: Plan, row: Row, seed: int, log: Callable[[str], None] = print) -> str:
    """Train one row+seed into its run directory unless it is finished; returns what was done
    ('kept', 'trained', 'resumed')."""
    from .train import train
    from .train.state import list_checkpoints
    from .train.trainer import trim_metrics

    run = plan.run_dir(row, seed)
    cfg = row_config(plan, row, seed)
    state = run_state(run)
    if state in ("finished", "partial"):
        _check_same_config(run, cfg)
    if state == "finished":
        return "kept"
    probe_file = run / PROBE_FILE
    (run / RESULT_FILE).unlink(missing_ok=True)  # an evaluation of an earlier state of the run
    start = 0
    if state == "partial":
        start = int(list_checkpoints(run)[-1].name.split("_")[1])
        trim_metrics(probe_file, start)  # the records after the checkpoint's update are redone
    run.parent.mkdir(parents=True, exist_ok=True)
    log(f"aiayn ablate: {'resuming' if state == 'partial' else 'training'} {row.run_name} seed {seed} "
        f"({', '.join(row.overrides()) or 'the base config'}) into {run}")
    with AttentionProbe(probe_file, cfg.train.log_every, start):
        train(plan.config, plan.data, run, plan.overrides(row, seed), resume=state == "partial",
              force=state != "partial")
    return "resumed" if state == "partial" else "trained"


def dev_perplexity(model, data, batch_tokens: int = 6000) -> tuple[float, int]:
    """Teacher-forced perplexity of the valid split without label smoothing (exp of the mean NLL
    per target token, EOS included; sentences truncated as `aiayn.train.validation`): (ppl, tokens)."""
    import numpy as np
    import torch

    from .data import TokenBatchSampler
    from .train.step import Criterion

    model.eval()
    valid = data.split("valid")
    limit = model.config.max_positions - 1
    criterion = Criterion(model, 0.0)
    nll_sum, n_tokens = 0.0, 0
    with torch.no_grad():
        for idx in TokenBatchSampler(np.minimum(valid.src_lens, limit), np.minimum(valid.tgt_lens, limit),
                                     batch_tokens, shuffle=False):
            batch = valid.collate(idx, limit)
            _, nll, _ = criterion(batch)
            nll_sum += float(nll)
            n_tokens += batch.n_tgt_tokens
    return math.exp(min(nll_sum / max(n_tokens, 1), 700.0)), n_tokens


def evaluate_run(plan: Plan, row: Row, seed: int) -> dict:
    """The run's final checkpoint on the valid split (cached in result.json): perplexity, BLEU
    of beam 4, parameters, updates."""
    from .checkpoint import load_checkpoint
    from .config import SearchConfig
    from .data import load_dataset
    from .evaluate import score
    from .translator import Translator

    run = plan.run_dir(row, seed)
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()][-1]
    cached = run / RESULT_FILE
    if cached.is_file():
        result = json.loads(cached.read_text(encoding="utf-8"))
        if result.get("step") == last.get("step"):
            return result
    t0 = time.perf_counter()
    data = load_dataset(plan.data)
    ckpt = load_checkpoint(run / "last")
    params = ckpt.model.num_parameters()
    ppl, tokens = dev_perplexity(ckpt.model, data)
    search = SearchConfig(**{**dataclasses.asdict(ckpt.search), "beam": EVAL_BEAM})
    sources, refs = data.raw("valid", "src"), data.raw("valid", "tgt")
    translator = Translator(ckpt, search=search, precision=EVAL_PRECISION)
    hyps = translator.translate(sources)
    (run / "dev.hyp").write_text("".join(f"{h}\n" for h in hyps), encoding="utf-8")
    scores = score(hyps, refs)
    result = {"row": row.run_name, "seed": seed, "step": last.get("step"), "stop_reason": last.get("reason"),
              "train_s": last.get("elapsed_s"), "parameters": params, "dev_ppl": ppl, "dev_tokens": tokens,
              "dev_bleu": scores["bleu"], "bleu_signature": scores["bleu_signature"],
              "dev_sentences": len(refs), "search": dataclasses.asdict(search), "checkpoint": "last",
              "precision": EVAL_PRECISION, "eval_s": time.perf_counter() - t0}
    cached.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def run_ablation(plan: Plan, log: Callable[[str], None] = print) -> dict:
    """Train and evaluate every row and seed of ``plan`` (resuming where a run stopped), writing
    the table after each evaluation. Returns the table (table.json's content)."""
    plan.out.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, int], dict] = {}
    table = None
    done: set[tuple[str, int]] = set()
    for row in plan.rows:
        for seed in plan.seeds[row.name]:
            key = (row.run_name, seed)
            if key not in done:
                what = train_run(plan, row, seed, log)
                if what == "kept":
                    log(f"aiayn ablate: {row.run_name} seed {seed}: finished before, kept")
                results[key] = evaluate_run(plan, row, seed)
                done.add(key)
                r = results[key]
                log(f"aiayn ablate: {row.run_name} seed {seed}: update {r['step']}, dev perplexity {r['dev_ppl']:.2f}, "
                    f"dev BLEU {r['dev_bleu']:.2f}")
                table = write_table(plan, results)
    return table if table is not None else write_table(plan, results)


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _probe_summary(run: Path) -> dict | None:
    """The last probe record's per-kind means, and the first's (how they moved in training)."""
    path = run / PROBE_FILE
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records:
        return None
    return {"first_step": records[0]["step"], "first": records[0]["mean"], "last_step": records[-1]["step"],
            "last": records[-1]["mean"], "records": len(records)}


def table_rows(plan: Plan, results: dict[tuple[str, int], dict]) -> list[dict]:
    """One entry per row: its columns, its seeds' results, mean ± std, and the comparison with base."""
    entries = []
    base_entry = None
    for row in plan.rows:
        cfg = row_config(plan, row)
        m, t = cfg.model, cfg.train
        seeds = [results[(row.run_name, s)] for s in plan.seeds[row.name] if (row.run_name, s) in results]
        entry = {
            "group": row.group, "name": row.name, "paper": row.paper, "overrides": row.overrides(),
            "same_as": row.same_as,
            "N": m.n_encoder_layers if m.n_encoder_layers == m.n_decoder_layers
            else f"{m.n_encoder_layers}+{m.n_decoder_layers}",
            "d_model": m.d_model, "d_ff": m.d_ff, "h": m.n_heads, "d_k": m.d_k, "d_v": m.d_k,
            "P_drop": m.dropout, "eps_ls": t.label_smoothing, "positions": m.positions,
            "attention_scale": m.attention_scale, "norm_first": m.norm_first, "tie_embeddings": m.tie_embeddings,
            "parameters": seeds[0]["parameters"] if seeds else None,
            "seeds": [{k: r[k] for k in ("seed", "step", "dev_ppl", "dev_bleu", "train_s")} for r in seeds],
            "probe": [_probe_summary(plan.run_dir(row, s)) for s in plan.seeds[row.name]],
        }
        for metric in ("dev_ppl", "dev_bleu"):
            entry[metric], entry[f"{metric}_std"] = _mean_std([r[metric] for r in seeds])
        entry["updates"] = statistics.fmean([r["step"] for r in seeds]) if seeds else None
        if row.group == "base":
            base_entry = entry
        entries.append(entry)
    for entry in entries:
        for metric in ("dev_ppl", "dev_bleu"):
            entry[f"{metric}_delta"], entry[f"{metric}_beyond_noise"] = _versus_base(entry, base_entry, metric)
    return entries


def _versus_base(entry: dict, base: dict | None, metric: str) -> tuple[float | None, bool | None]:
    """The difference of the row's mean from the base's, and whether it exceeds NOISE_SIGMAS of
    the base's seed standard deviation (None: not known, e.g. fewer than 2 base seeds)."""
    if base is None or entry is base or entry[metric] is None or base[metric] is None:
        return None, None
    delta = entry[metric] - base[metric]
    std = base[f"{metric}_std"]
    return delta, (None if std is None else abs(delta) > NOISE_SIGMAS * std)


def _cell(value, base_value, always: bool) -> str:
    if not always and value == base_value:
        return ""
    if isinstance(value, float):
        return _num(value)
    return str(value)


def _pm(mean, std, digits: int = 2) -> str:
    if mean is None:
        return "—"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def _delta(entry: dict, metric: str) -> str:
    delta, beyond = entry[f"{metric}_delta"], entry[f"{metric}_beyond_noise"]
    if delta is None:
        return ""
    return f"{delta:+.2f}" + {True: " **yes**", False: " no", None: " ?"}[beyond]


def _other(entry: dict, base: dict) -> str:
    parts = []
    if entry["positions"] != base["positions"]:
        parts.append(f"positions {entry['positions']}")
    if entry["attention_scale"] != base["attention_scale"]:
        parts.append("no 1/√d_k" if not entry["attention_scale"] else "1/√d_k")
    if entry["norm_first"] != base["norm_first"]:
        parts.append("pre-LN" if entry["norm_first"] else "post-LN")
    if entry["tie_embeddings"] != base["tie_embeddings"]:
        parts.append(f"tie {entry['tie_embeddings']}")
    return ", ".join(parts)


def markdown(plan: Plan, entries: list[dict]) -> str:
    base = next(e for e in entries if e["group"] == "base")
    lines = [
        f"# Table 3 at the scale of `{Path(plan.config).name}`",
        "",
        f"Data `{plan.data}`; every run trained for {plan.budget}; dev = the valid split, the final checkpoint "
        f"(no averaging, as the paper's Table 3), perplexity teacher-forced without label smoothing, sacreBLEU of "
        f"beam {EVAL_BEAM}. Mean ± standard deviation over the seeds (n); Δ: the difference from the base's mean, "
        f"**yes** where it exceeds {NOISE_SIGMAS:g} standard deviations of the base's seeds. Empty cells equal the "
        "base, as in the paper.",
        "",
        "| | row | the paper's row | N | d_model | d_ff | h | d_k | d_v | P_drop | ε_ls | other | n | updates "
        "| dev PPL | Δ PPL | dev BLEU | Δ BLEU | params |",
        "|" + " --- |" * 19,
    ]
    group = None
    for e in entries:
        always = e is base
        shown = e["group"] if e["group"] != group else ""
        group = e["group"]
        name = e["name"] + (f" (= {e['same_as']})" if e["same_as"] else "")
        params = f"{e['parameters'] / 1e6:.2f}M" if e["parameters"] else "—"
        lines.append("| " + " | ".join([
            shown, name, e["paper"],
            *(_cell(e[k], base[k], always) for k in ("N", "d_model", "d_ff", "h", "d_k", "d_v", "P_drop", "eps_ls")),
            _other(e, base), str(len(e["seeds"])), f"{e['updates']:.0f}" if e["updates"] is not None else "—",
            _pm(e["dev_ppl"], e["dev_ppl_std"]), _delta(e, "dev_ppl"),
            _pm(e["dev_bleu"], e["dev_bleu_std"]), _delta(e, "dev_bleu"), params]) + " |")
    probed = [e for e in entries if e["group"] in ("base", "claims") and any(e["probe"])]
    if probed:
        lines += ["", "## The attention logits (claims rows and base)", "",
                  "At the last probe of each run (`probe.jsonl`), the mean over the seeds and layers: the norm of "
                  "d loss / d logits, the softmax's saturation (mean largest probability) and the logits' standard "
                  "deviation, for encoder self-attention, decoder self-attention and encoder-decoder attention.", "",
                  "| row | update | grad norm enc / dec / cross | saturation enc / dec / cross "
                  "| logit std enc / dec / cross |", "| --- | --- | --- | --- | --- |"]
        for e in probed:
            summaries = [p for p in e["probe"] if p]
            cells = []
            for key, fmt in (("grad_norm", "{:.2e}"), ("saturation", "{:.3f}"), ("logit_std", "{:.2f}")):
                vals = []
                for kind in ("enc_self", "dec_self", "cross"):
                    xs = [p["last"][kind][key] for p in summaries if kind in p["last"]]
                    vals.append(fmt.format(statistics.fmean(xs)) if xs else "—")
                cells.append(" / ".join(vals))
            step = statistics.fmean(p["last_step"] for p in summaries)
            lines.append(f"| {e['name']} | {step:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "Each row's runs: `OUT/<row>/seed<k>/` (`metrics.jsonl`, `probe.jsonl`, `result.json`, `dev.hyp`).", ""]
    return "\n".join(lines)


def write_table(plan: Plan, results: dict[tuple[str, int], dict]) -> dict:
    """OUT/table.md, OUT/table.json, OUT/table.png and OUT/claims.png from the results so far."""
    entries = table_rows(plan, results)
    table = {"config": plan.config, "data": str(plan.data), "budget": plan.budget, "overrides": plan.common,
             "beam": EVAL_BEAM, "checkpoint": "last", "noise_sigmas": NOISE_SIGMAS, "rows": entries}
    (plan.out / "table.json").write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    (plan.out / "table.md").write_text(markdown(plan, entries), encoding="utf-8")
    plot_table(entries, plan.out / "table.png")
    plot_claims(plan, entries, plan.out / "claims.png")
    return table


def plot_table(entries: list[dict], out: Path) -> Path:
    """Dev BLEU and perplexity per row: each seed a dot, the mean ± std a bar, the base's mean and
    its noise band (NOISE_SIGMAS standard deviations) shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 0.32 * len(entries) + 1.6), sharey=True)
    ys = list(range(len(entries)))[::-1]
    base = next(e for e in entries if e["group"] == "base")
    for ax, metric, label in ((axes[0], "dev_bleu", "dev BLEU (beam 4)"), (axes[1], "dev_ppl", "dev perplexity")):
        if base[metric] is not None:
            ax.axvline(base[metric], color="grey", lw=1)
            if base[f"{metric}_std"] is not None:
                s = NOISE_SIGMAS * base[f"{metric}_std"]
                ax.axvspan(base[metric] - s, base[metric] + s, color="grey", alpha=0.15)
        for y, e in zip(ys, entries):
            values = [s[metric] for s in e["seeds"]]
            if not values:
                continue
            color = "C3" if e[f"{metric}_beyond_noise"] else "C0"
            ax.scatter(values, [y] * len(values), s=12, color=color, alpha=0.6)
            ax.errorbar(e[metric], y, xerr=e[f"{metric}_std"] or 0, fmt="o", color=color, ms=5, capsize=3)
        ax.set_xlabel(label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, [e["name"] for e in entries])
    fig.suptitle("Table 3 rows: seeds (dots), mean ± std; grey: the base's mean ± "
                 f"{NOISE_SIGMAS:g} std; red: beyond it", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_claims(plan: Plan, entries: list[dict], out: Path) -> Path | None:
    """The base and claims rows (first seed): training loss, the attention logits' gradient norm
    and the softmax's saturation (means over layers and kinds) against the update."""
    rows = [e for e in entries if e["group"] in ("base", "claims")]
    curves = []
    for e in rows:
        row = next(r for r in plan.rows if r.name == e["name"])
        run = plan.run_dir(row, plan.seeds[row.name][0])
        if not (run / "metrics.jsonl").is_file():
            continue
        train = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
                 if '"kind": "train"' in line]
        probe = [json.loads(line) for line in (run / PROBE_FILE).read_text(encoding="utf-8").splitlines()
                 if line.strip()] if (run / PROBE_FILE).is_file() else []
        curves.append((e["name"], train, probe))
    if len(curves) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (name, train, probe) in enumerate(curves):
        style = dict(lw=1, label=name, color=f"C{i % 10}")
        axes[0].plot([r["step"] for r in train], [r["nll"] for r in train], **style)
        steps = [r["step"] for r in probe]
        for ax, key in ((axes[1], "grad_norm"), (axes[2], "saturation")):
            ax.plot(steps, [statistics.fmean(v[key] for v in r["mean"].values()) for r in probe], **style)
    axes[0].set_ylabel("train NLL")
    axes[1].set_ylabel("‖d loss / d attention logits‖ (mean)")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("softmax saturation (mean max probability)")
    for ax in axes:
        ax.set_xlabel("update")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
