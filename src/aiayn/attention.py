"""Seeing inside: the attention probabilities of every layer and head, as heatmaps and JSON.

Three kinds of attention, as in the paper's Figures 3-5:

    encoder  encoder self-attention        rows: source tokens,  columns: source tokens
    decoder  masked decoder self-attention rows: target tokens,  columns: decoder inputs
    cross    encoder-decoder attention     rows: target tokens,  columns: source tokens

Row i belongs to decoder position i, which reads the input <s> y_1 ... y_{i-1} and predicts
y_i; rows are labelled with the token they predict (y_1 ... y_n, </s>), so the cross-attention
picture reads as an alignment of each output token with the source. The probabilities come from
the model's explicit attention path (`Transformer.attention_weights`), which equals the fused
path used for training and translation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import Checkpoint, load_checkpoint
from .config import SearchConfig
from .errors import UserError
from .files import atomic_directory, refuse_to_replace

KINDS = {
    "encoder": "Encoder self-attention",
    "decoder": "Decoder self-attention (masked)",
    "cross": "Encoder-decoder attention",
}


@dataclass
class AttentionMaps:
    src_tokens: list[str]  # subword pieces of the source, then </s>
    tgt_tokens: list[str]  # the tokens each decoder position predicts: y_1 ... y_n, </s>
    tgt_inputs: list[str]  # what each decoder position reads: <s>, y_1 ... y_n
    weights: dict[str, torch.Tensor]  # kind -> (layers, heads, rows, columns)


def check_length(tokenizer, model_config, text: str, side: str) -> list[int]:
    """The subword ids of ``text``; a `UserError` if the model cannot read that many positions
    (``max_positions`` - 1: room for the EOS of the source, or the BOS of the target)."""
    ids = tokenizer.encode(text, "src" if side == "source" else "tgt")
    limit = model_config.max_positions - 1
    if model_config.positions == "learned" and len(ids) > limit:
        raise UserError(f"the {side} has {len(ids)} subwords; this model reads at most {limit}")
    return ids


@torch.no_grad()
def attention_maps(ckpt: Checkpoint | str | Path, src_text: str, tgt_text: str | None = None, *,
                   tgt_ids: list[int] | None = None, search: SearchConfig | None = None) -> AttentionMaps:
    """Attention of a checkpoint's model (a `Checkpoint` or its directory) on one sentence pair.
    The target is ``tgt_ids`` (subword ids, e.g. a search's own output), else ``tgt_text``
    encoded, else the model's own translation (beam search with ``search``, default the
    checkpoint's recommended settings). Too long a source or target is a `UserError`."""
    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    model, tok = ckpt.model, ckpt.tokenizer
    device = next(model.parameters()).device
    src_ids = check_length(tok, model.config, src_text, "source") + [tok.eos_id]
    src = torch.tensor([src_ids], device=device)
    if tgt_ids is None and tgt_text is not None:
        tgt_ids = check_length(tok, model.config, tgt_text, "target")
    if tgt_ids is None:
        from .search import search as run_search

        tgt_ids = run_search(model, src, search or ckpt.search)[0][0].tokens
    tgt_in = torch.tensor([[tok.bos_id] + list(tgt_ids)], device=device)
    maps = model.attention_weights(src, tgt_in)
    weights = {kind: torch.stack([w[0] for w in maps[kind]]).float().cpu() for kind in KINDS}
    return AttentionMaps(
        src_tokens=tok.pieces(src_ids[:-1], "src") + ["</s>"],
        tgt_tokens=tok.pieces(list(tgt_ids)) + ["</s>"],
        tgt_inputs=["<s>"] + tok.pieces(list(tgt_ids)),
        weights=weights,
    )


def axis_labels(maps: AttentionMaps, kind: str) -> tuple[list[str], list[str]]:
    """(row labels, column labels) of one kind of attention."""
    if kind == "encoder":
        return maps.src_tokens, maps.src_tokens
    if kind == "decoder":
        return maps.tgt_tokens, maps.tgt_inputs
    return maps.tgt_tokens, maps.src_tokens


def plot_grid(weights: torch.Tensor, rows: list[str], cols: list[str], title: str, path: Path) -> None:
    """One heatmap per (layer, head): layers down, heads across; tokens on the outer axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers, n_heads = weights.shape[:2]
    cell = 0.16 * max(len(rows), len(cols)) + 0.6
    fig, axes = plt.subplots(
        n_layers, n_heads, figsize=(cell * n_heads + 1.0, cell * n_layers + 1.0), squeeze=False
    )
    fontsize = max(4, min(8, 220 // max(len(rows), len(cols), 1)))
    for layer in range(n_layers):
        for head in range(n_heads):
            ax = axes[layer][head]
            ax.imshow(weights[layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
            ax.set_xticks(range(len(cols)))
            ax.set_yticks(range(len(rows)))
            ax.set_xticklabels(cols if layer == n_layers - 1 else [], rotation=90, fontsize=fontsize)
            ax.set_yticklabels(rows if head == 0 else [], fontsize=fontsize)
            ax.tick_params(length=0)
            if layer == 0:
                ax.set_title(f"head {head + 1}", fontsize=9)
            if head == 0:
                ax.set_ylabel(f"layer {layer + 1}", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_mean_per_layer(weights: torch.Tensor, rows: list[str], cols: list[str], title: str, path: Path) -> None:
    """One heatmap per layer, averaged over its heads: the easiest picture to read an alignment from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = weights.shape[0]
    cell = 0.22 * max(len(rows), len(cols)) + 1.0
    fig, axes = plt.subplots(1, n_layers, figsize=(cell * n_layers + 1.0, cell + 1.2), squeeze=False)
    for layer in range(n_layers):
        ax = axes[0][layer]
        ax.imshow(weights[layer].mean(0).numpy(), cmap="viridis", vmin=0.0, aspect="auto")
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols, rotation=90, fontsize=8)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(rows if layer == 0 else [], fontsize=8)
        ax.set_title(f"layer {layer + 1}, mean of heads", fontsize=9)
        ax.tick_params(length=0)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def export(maps: AttentionMaps, out: Path) -> list[Path]:
    """Write <kind>.png grids, cross_mean.png and attention.json into ``out``."""
    written = []
    for kind, title in KINDS.items():
        rows, cols = axis_labels(maps, kind)
        path = out / f"{kind}.png"
        plot_grid(maps.weights[kind], rows, cols, title, path)
        written.append(path)
    rows, cols = axis_labels(maps, "cross")
    plot_mean_per_layer(maps.weights["cross"], rows, cols, KINDS["cross"], out / "cross_mean.png")
    written.append(out / "cross_mean.png")
    doc = {
        "src_tokens": maps.src_tokens,
        "tgt_tokens": maps.tgt_tokens,
        "tgt_inputs": maps.tgt_inputs,
        "layout": "weights[kind][layer][head][row][column]; rows and columns as axis_labels in aiayn.attention",
        "rows": {kind: axis_labels(maps, kind)[0] for kind in KINDS},
        "columns": {kind: axis_labels(maps, kind)[1] for kind in KINDS},
        "weights": {kind: [[[[round(float(p), 6) for p in row] for row in head] for head in layer]
                           for layer in maps.weights[kind]] for kind in KINDS},
    }
    (out / "attention.json").write_text(json.dumps(doc, ensure_ascii=False) + "\n", encoding="utf-8")
    written.append(out / "attention.json")
    return written


def export_attention(checkpoint: str | Path | Checkpoint, src: str, out: str | Path, tgt: str | None = None, *,
                     force: bool = False, search: SearchConfig | None = None) -> list[Path]:
    """Draw and save the attention of one sentence pair (`attention_maps`) into the directory
    ``out`` (replaced only with ``force``); returns the files written."""
    out = Path(out)
    refuse_to_replace(out, force, kind="attention")  # before the work; atomic_directory checks again
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    if not src.strip():
        raise UserError("the source sentence is empty: give a sentence to look at")
    maps = attention_maps(ckpt, src, tgt, search=search)
    with atomic_directory(out, kind="attention", force=force) as tmp:
        names = [p.name for p in export(maps, tmp)]
    return [out / name for name in names]

