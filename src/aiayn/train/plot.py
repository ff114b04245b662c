"""``aiayn plot RUN_DIR``: the loss and BLEU curves of a run, from its metrics.jsonl, as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .trainer import METRICS_FILE


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"no {METRICS_FILE} here (is this a run directory of aiayn train?)", path=path.parent)
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(f"invalid JSON: {e.msg}", path=path, line=lineno) from None
    return records


def plot_curves(records: list[dict], out: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    valid = [r for r in records if r.get("kind") == "valid"]
    if not train and not valid:
        raise UserError("the metrics log has no train or valid records yet", path=out.parent)
    fig, (ax_loss, ax_bleu) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [r["step"] for r in train]
        ax_loss.plot(steps, [r["loss"] for r in train], label="train loss (label-smoothed)", lw=1)
        ax_loss.plot(steps, [r["nll"] for r in train], label="train NLL", lw=1, alpha=0.7)
    if valid:
        steps = [r["step"] for r in valid]
        ax_loss.plot(steps, [r["loss"] for r in valid], "o-", label="valid loss (label-smoothed)", ms=3)
        ax_loss.plot(steps, [r["nll"] for r in valid], "s--", label="valid NLL", ms=3)
        bleu = [(r["step"], r["bleu"]) for r in valid if r.get("bleu") is not None]
        if bleu:
            ax_bleu.plot([s for s, _ in bleu], [b for _, b in bleu], "o-", color="tab:green", ms=3)
            best = max(bleu, key=lambda sb: sb[1])
            ax_bleu.annotate(f"best {best[1]:.2f} @ {best[0]}", best, textcoords="offset points", xytext=(-5, -12),
                             ha="right")
    ax_loss.set_xlabel("update")
    ax_loss.set_ylabel("nats per target token")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_bleu.set_xlabel("update")
    ax_bleu.set_ylabel("BLEU (greedy, valid)")
    ax_bleu.set_title("validation BLEU")
    ax_bleu.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

