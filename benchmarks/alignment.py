"""aiayn's word alignments against eflomal's, for every decoder layer and head.

    python benchmarks/alignment.py --checkpoint CK --data DATASET --name NAME [--sentences N]

The test split of a prepared dataset (its references, teacher-forced: the same pairs both
aligners see) is aligned

- by eflomal (pip install eflomal, the ``bench`` extra), trained on the dataset's training pairs
  plus the test pairs, lowercased, whitespace tokens; its forward and reverse links symmetrised
  with grow-diag-final-and (Koehn et al. 2005), the usual reference when no gold standard is at
  hand;
- by aiayn, from every decoder layer's encoder-decoder attention: each head and the mean of the
  layer's heads; the rows that read each target word and the rows that predict it; the source's
  </s> column dropped and renormalised (aiayn's rule) or kept as a "null" word (a target word
  whose largest weight is on </s> is then left unaligned).

Each variant is scored against eflomal's links (`aiayn.alignment.Agreement`: precision, recall,
AER = 1 - F1 with one reference set). Writes benchmarks/ALIGNMENT-NAME.json and .png, and prints
a Markdown table; with --examples K, K sentences with both alignments side by side
(benchmarks/ALIGNMENT-NAME-examples.md, or --examples-out) for checking by hand.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from aiayn.alignment import (
    Agreement,
    AlignmentSettings,
    align_ids,
    cross_attention,
    parse_pharaoh,
    to_pharaoh,
    word_ids,
)
from aiayn.checkpoint import load_checkpoint
from aiayn.data import load_dataset

HERE = Path(__file__).resolve().parent


def grow_diag_final_and(fwd: set, rev: set, n_src: int, n_tgt: int) -> set:
    """Koehn et al.'s symmetrisation of two directional alignments (links (i, j))."""
    alignment = fwd & rev
    union = fwd | rev
    neighbours = [(-1, 0), (0, -1), (1, 0), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)]

    def src_aligned(i):
        return any(a == i for a, _ in alignment)

    def tgt_aligned(j):
        return any(b == j for _, b in alignment)

    added = True
    while added:
        added = False
        for i, j in sorted(alignment):
            for di, dj in neighbours:
                ni, nj = i + di, j + dj
                if (ni, nj) in union and (ni, nj) not in alignment and 0 <= ni < n_src and 0 <= nj < n_tgt:
                    if not src_aligned(ni) or not tgt_aligned(nj):
                        alignment.add((ni, nj))
                        added = True
    for i, j in sorted(union):  # final-and: a link of either direction whose two words are both unaligned
        if (i, j) not in alignment and not src_aligned(i) and not tgt_aligned(j):
            alignment.add((i, j))
    return alignment


def eflomal_links(train_src: list[str], train_tgt: list[str], test_src: list[str], test_tgt: list[str]) -> list[set]:
    import eflomal

    src = [s.lower() for s in train_src + test_src]
    tgt = [t.lower() for t in train_tgt + test_tgt]
    with tempfile.TemporaryDirectory() as tmp:
        fwd, rev = Path(tmp) / "fwd", Path(tmp) / "rev"
        eflomal.Aligner().align(src, tgt, links_filename_fwd=str(fwd), links_filename_rev=str(rev))
        fwd_lines = fwd.read_text().split("\n")[len(train_src): len(src)]
        rev_lines = rev.read_text().split("\n")[len(train_src): len(src)]
    return [grow_diag_final_and(set(parse_pharaoh(f)), set(parse_pharaoh(r)), len(s.split()), len(t.split()))
            for f, r, s, t in zip(fwd_lines, rev_lines, test_src, test_tgt)]


def variants(n_layers: int, n_heads: int):
    for layer in range(n_layers):
        for head in [*range(n_heads), None]:
            for rows in ("reads", "predicts"):
                for eos in ("drop", "null"):
                    yield layer, head, rows, eos


def links_of(cross: torch.Tensor, n_tgt: int, n_src: int, tgt_words: list[int], src_words: list[int],
             rows: str, eos: str) -> list[list[tuple[int, int]]]:
    """Hard links of one sentence from the attention of several heads at once, ``cross`` (K, T, S),
    as `aiayn.alignment` computes them (eos "drop"), or with </s> as a null word (eos "null"):
    one list of links per head."""
    first = 1 if rows == "reads" else 0
    n_words = max(src_words) + 1
    if eos == "drop":
        block = cross[:, first: first + n_tgt, :n_src]
        block = block / block.sum(-1, keepdim=True).clamp_min(1e-30)
        columns = src_words
    else:
        block = cross[:, first: first + n_tgt, : n_src + 1]
        columns = src_words + [n_words]
    k = block.size(0)
    src_index, tgt_index = torch.tensor(columns), torch.tensor(tgt_words)
    by_src = torch.zeros(k, n_tgt, max(columns) + 1).index_add_(2, src_index, block)
    words = torch.zeros(k, max(tgt_words) + 1, by_src.size(2)).index_add_(1, tgt_index, by_src)
    best = words.argmax(-1).tolist()  # averaging over a target word's subwords does not move the argmax
    return [[(i, j) for j, i in enumerate(row) if i < n_words] for row in best]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="prepared dataset (train and test splits)")
    parser.add_argument("--name", required=True, help="results go to benchmarks/ALIGNMENT-NAME.*")
    parser.add_argument("--sentences", type=int, default=1000, help="test pairs (default %(default)s)")
    parser.add_argument("--examples", type=int, default=20, help="pairs written side by side for a hand check")
    parser.add_argument("--examples-out", metavar="FILE",
                        help="where they go (default benchmarks/ALIGNMENT-NAME-examples.md; keep the text of a "
                             "data set that is not yours out of the repository)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-out", metavar="FILE",
                        help="also write eflomal's symmetrised links of the test pairs there, one Pharaoh line "
                             "per pair (for aiayn heads --alignments)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_dataset(args.data)
    test_src, test_tgt = data.raw("test", "src")[: args.sentences], data.raw("test", "tgt")[: args.sentences]
    keep = [k for k in range(len(test_src)) if test_src[k].strip() and test_tgt[k].strip()]
    test_src, test_tgt = [test_src[k] for k in keep], [test_tgt[k] for k in keep]
    t0 = time.perf_counter()
    reference = eflomal_links(data.raw("train", "src"), data.raw("train", "tgt"), test_src, test_tgt)
    eflomal_s = time.perf_counter() - t0
    print(f"eflomal: {len(reference)} test pairs aligned in {eflomal_s:.1f} s", file=sys.stderr)
    if args.reference_out:
        Path(args.reference_out).write_text("".join(to_pharaoh(sorted(links)) + "\n" for links in reference),
                                            encoding="utf-8")

    ckpt = load_checkpoint(args.checkpoint)
    model, tok = ckpt.model.eval(), ckpt.tokenizer
    cfg = model.config
    scores = {v: Agreement() for v in variants(cfg.n_decoder_layers, cfg.n_heads)}
    default_links = []
    default_layer = AlignmentSettings().resolve_layer(cfg.n_decoder_layers)
    default_rows = AlignmentSettings().rows
    t0 = time.perf_counter()
    sources = tok.encode_batch(test_src, "src")
    targets = tok.encode_batch(test_tgt, "tgt")
    mismatched = 0
    for start in range(0, len(sources), 32):
        src_b, tgt_b = sources[start: start + 32], targets[start: start + 32]
        layers = cross_attention(model, src_b, tgt_b)  # per layer (B, h, T, S)
        for row, (s, t) in enumerate(zip(src_b, tgt_b)):
            k = start + row
            src_words, tgt_words = word_ids(tok.pieces(s, "src")), word_ids(tok.pieces(t, "tgt"))
            if (max(src_words) + 1, max(tgt_words) + 1) != (len(test_src[k].split()), len(test_tgt[k].split())):
                mismatched += 1
            for layer in range(cfg.n_decoder_layers):
                weights = layers[layer][row].float()
                heads = torch.cat([weights, weights.mean(0, keepdim=True)])  # each head, then the mean
                for rows in ("reads", "predicts"):
                    for eos in ("drop", "null"):
                        found = links_of(heads, len(t), len(s), tgt_words, src_words, rows, eos)
                        for head, links in zip([*range(cfg.n_heads), None], found):
                            scores[(layer, head, rows, eos)].add(links, reference[k])
                        if (layer, rows, eos) == (default_layer, default_rows, "drop"):
                            default_links.append(found[-1])
    aiayn_s = time.perf_counter() - t0
    # The vectorised scoring above must be what aiayn itself outputs (on the same batch: another
    # padding changes the attention in its last bits, which can flip a near-tie).
    check = align_ids(model, tok, sources[:32], targets[:32], AlignmentSettings())
    assert [a.links for a in check] == default_links[:32], "benchmark and aiayn.alignment disagree"

    def name(layer, head):
        return f"layer {layer + 1} " + ("mean" if head is None else f"head {head + 1}")

    table = [{"layer": layer + 1, "head": None if head is None else head + 1, "rows": rows, "eos": eos,
              **a.to_dict()} for (layer, head, rows, eos), a in scores.items()]
    best = min(table, key=lambda r: r["aer"])
    result = {
        "checkpoint": str(args.checkpoint), "data": str(args.data), "pairs": len(test_src),
        "word_count_mismatches": mismatched,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "eflomal_seconds": round(eflomal_s, 1), "aiayn_seconds_all_variants": round(aiayn_s, 1),
        "model": {"decoder_layers": cfg.n_decoder_layers, "heads": cfg.n_heads, "d_model": cfg.d_model},
        "best": best, "variants": table,
    }
    out = HERE / f"ALIGNMENT-{args.name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")

    print("| variant | AER reads | AER predicts | P reads | R reads | AER reads, </s> as null |")
    print("| --- | --- | --- | --- | --- | --- |")
    for layer in range(cfg.n_decoder_layers):
        for head in [*range(cfg.n_heads), None]:
            r, p, n = (scores[(layer, head, "reads", "drop")], scores[(layer, head, "predicts", "drop")],
                       scores[(layer, head, "reads", "null")])
            print(f"| {name(layer, head)} | {r.aer:.3f} | {p.aer:.3f} | {r.precision:.3f} | {r.recall:.3f} | "
                  f"{n.aer:.3f} |")
    print(f"\nbest: {best}", file=sys.stderr)

    _picture(scores, cfg, HERE / f"ALIGNMENT-{args.name}.png", args.name)
    if args.examples:
        lines = [f"# {args.name}: {args.examples} test pairs, aiayn's default alignment against eflomal's\n",
                 "Each target word: the source word aiayn links it to, and eflomal's links (grow-diag-final-and).\n"]
        for k in range(min(args.examples, len(test_src))):
            src_words, tgt_words = test_src[k].split(), test_tgt[k].split()
            lines.append(f"## {k + 1}\n\n- source: {test_src[k]}\n- target: {test_tgt[k]}\n")
            lines.append("| target word | aiayn | eflomal |\n| --- | --- | --- |")
            for j, word in enumerate(tgt_words):
                ours = [src_words[i] for i, jj in default_links[k] if jj == j and i < len(src_words)]
                theirs = [src_words[i] for i, jj in sorted(reference[k]) if jj == j and i < len(src_words)]
                lines.append(f"| {word} | {' '.join(ours)} | {' '.join(theirs)} |")
            lines.append("")
        examples = Path(args.examples_out) if args.examples_out else HERE / f"ALIGNMENT-{args.name}-examples.md"
        examples.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


def _picture(scores, cfg, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(2.2 + 1.1 * (cfg.n_heads + 1) * 2, 1.2 + 0.8 * cfg.n_decoder_layers))
    for ax, rows in zip(axes, ("reads", "predicts")):
        grid = [[scores[(layer, head, rows, "drop")].aer for head in [*range(cfg.n_heads), None]]
                for layer in range(cfg.n_decoder_layers)]
        im = ax.imshow(grid, cmap="viridis_r", vmin=0.0, vmax=1.0, aspect="auto")
        for layer, line in enumerate(grid):
            for col, value in enumerate(line):
                ax.text(col, layer, f"{value:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if value > 0.6 else "black")
        ax.set_xticks(range(cfg.n_heads + 1), [f"h{h + 1}" for h in range(cfg.n_heads)] + ["mean"])
        ax.set_yticks(range(cfg.n_decoder_layers), [f"layer {i + 1}" for i in range(cfg.n_decoder_layers)])
        ax.set_title(f"AER vs eflomal, rows that {rows[:-1]}", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.suptitle(f"{title}: encoder-decoder attention as word alignment")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
