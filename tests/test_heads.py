"""`aiayn heads`: masking heads, the attention statistics and roles, alignment agreement, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from aiayn.checkpoint import load_checkpoint
from aiayn.cli import main
from aiayn.data.tokenizer import BOS_ID, EOS_ID
from aiayn.heads import (
    ALIGNMENT_ROWS,
    KINDS,
    Head,
    StatisticsAccumulator,
    assign_role,
    attention_module,
    is_punctuation,
    mask_heads,
    measure_heads,
    nll_per_token,
    read_inputs,
)

from helpers import TEXT, model_log_prob, random_ids, small_model


def decoder_inputs(b: int, t: int, seed: int = 2) -> torch.Tensor:
    tgt_in = random_ids(b, t, seed=seed)
    tgt_in[:, 0] = BOS_ID
    return tgt_in


# -- masking -------------------------------------------------------------------------------------

# Which attention weights cannot change when a head of (kind, layer 0) is masked: that layer's own
# (its weights are computed before W^O), and everything computed before its output is used.
UNCHANGED = {
    "encoder": {"encoder": [0], "decoder": [0], "cross": []},
    "decoder": {"encoder": [0, 1], "decoder": [0], "cross": []},
    "cross": {"encoder": [0, 1], "decoder": [0], "cross": [0]},
}


@pytest.mark.parametrize("kind", KINDS)
def test_a_masked_head_contributes_nothing_and_changes_nothing_before_it(kind):
    model = small_model()
    plain_weight = attention_module(model, kind, 0).out_proj.weight.clone()
    src, tgt_in = random_ids(2, 7), decoder_inputs(2, 5)
    head, d_k = 2, model.config.d_k
    masked = mask_heads(model, [Head(kind, 0, head)])
    assert torch.equal(attention_module(model, kind, 0).out_proj.weight, plain_weight)  # the model is not changed

    before, after = model.attention_weights(src, tgt_in), masked.attention_weights(src, tgt_in)
    for other_kind, layers in UNCHANGED[kind].items():
        for layer in layers:
            assert torch.equal(before[other_kind][layer], after[other_kind][layer]), (other_kind, layer)
    assert not torch.allclose(model(src, tgt_in), masked(src, tgt_in))

    # The masked attention's output, against W^O applied by hand to the heads' outputs with this one zeroed.
    captured = {}
    module = attention_module(masked, kind, 0).out_proj
    handle = module.register_forward_hook(lambda mod, inputs, output: captured.update(x=inputs[0], y=output))
    with torch.no_grad():
        masked(src, tgt_in)
    handle.remove()
    x, y = captured["x"], captured["y"]
    zeroed = x.clone()
    zeroed[..., head * d_k:(head + 1) * d_k] = 0.0
    torch.testing.assert_close(y, F.linear(zeroed, plain_weight, module.bias), atol=1e-6, rtol=0)
    scrambled = x.clone()
    scrambled[..., head * d_k:(head + 1) * d_k] = torch.randn_like(scrambled[..., head * d_k:(head + 1) * d_k]) * 10
    assert torch.equal(F.linear(scrambled, module.weight, module.bias), y)  # whatever the head writes, nothing passes


def test_masking_no_head_is_the_plain_model():
    model = small_model()
    src, tgt_in = random_ids(3, 6), decoder_inputs(3, 4)
    with torch.no_grad():
        assert torch.equal(mask_heads(model, [])(src, tgt_in), model(src, tgt_in))


def test_nll_per_token_is_the_mean_negative_log_probability():
    model = small_model(tie_embeddings="none")
    sources = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    targets = [[14, 15], [16, 17, 18, 19], [20]]
    total = -sum(model_log_prob(model, torch.tensor(s + [EOS_ID]), t) for s, t in zip(sources, targets))
    tokens = sum(len(t) + 1 for t in targets)
    for batch_size in (1, 2, 3):  # padding changes nothing
        assert nll_per_token(model, sources, targets, batch_size) == pytest.approx(total / tokens, rel=1e-5)


# -- statistics and roles --------------------------------------------------------------------------


def hand_made_attention():
    """Attention of a 1-layer, 4-head model on two sentences: sources of 3 and 2 tokens (+ </s>),
    targets of 4 and 2 tokens (decoder rows 5 and 3). Padding rows put all their weight on column 0,
    which would change every share if they were counted."""
    src_lengths, tgt_lengths = torch.tensor([4, 3]), torch.tensor([5, 3])
    s, t = 4, 5
    enc = torch.zeros(2, 4, s, s)
    dec = torch.zeros(2, 4, t, t)
    cross = torch.zeros(2, 4, t, s)
    for b in range(2):
        n, m = int(src_lengths[b]), int(tgt_lengths[b])
        for r in range(s):
            if r >= n:
                enc[b, :, r, 0] = 1.0
                continue
            enc[b, 0, r, max(r - 1, 0)] = 1.0  # previous
            enc[b, 1, r, n - 1] = 1.0  # </s>
            enc[b, 2, r, :n] = 1.0 / n  # uniform
            enc[b, 3, r, min(r + 1, n - 1)] = 1.0  # next
        for r in range(t):
            if r >= m:
                dec[b, :, r, 0] = 1.0
                cross[b, :, r, 0] = 1.0
                continue
            dec[b, 0, r, max(r - 1, 0)] = 1.0  # previous
            dec[b, 1, r, 0] = 1.0  # <s>
            dec[b, 2, r, r] = 1.0  # same
            dec[b, 3, r, :r + 1] = 1.0 / (r + 1)  # uniform over what it may see
            cross[b, 0, r, n - 1] = 1.0  # </s>
            cross[b, 1, r, 1] = 1.0  # the punctuation token
            cross[b, 2, r, 0] = 1.0  # one source token, confidently
            cross[b, 3, r, :n] = 1.0 / n  # uniform
    src_punct = torch.zeros(2, s, dtype=torch.bool)
    src_punct[:, 1] = True
    tgt_punct = torch.zeros(2, t, dtype=torch.bool)
    return {"encoder": [enc], "decoder": [dec], "cross": [cross]}, src_lengths, tgt_lengths, src_punct, tgt_punct


def test_statistics_of_hand_made_attention_give_the_shares_and_roles():
    weights, src_lengths, tgt_lengths, src_punct, tgt_punct = hand_made_attention()
    acc = StatisticsAccumulator({"encoder": 1, "decoder": 1, "cross": 1}, 4)
    acc.add(weights, src_lengths, tgt_lengths, src_punct, tgt_punct)
    stats = acc.result()
    enc, dec, cross = stats["encoder"][0], stats["decoder"][0], stats["cross"][0]
    # encoder: 7 real rows (4 + 3), 5 with a next real token, 5 with a previous one
    assert enc[0]["previous"] == pytest.approx(1.0) and enc[0]["same"] == pytest.approx(2 / 7)
    assert enc[1]["sink"] == pytest.approx(1.0) and enc[1]["next"] == pytest.approx(2 / 5)
    assert enc[3]["next"] == pytest.approx(1.0)
    assert enc[2]["entropy"] == pytest.approx((4 * math.log(4) + 3 * math.log(3)) / 7)
    assert enc[2]["entropy_normalized"] == pytest.approx(1.0)
    assert enc[2]["confidence"] == pytest.approx(2 / 7)
    assert enc[2]["punctuation"] == pytest.approx((4 * 0.25 + 3 / 3) / 7)
    assert enc[0]["entropy"] == pytest.approx(0.0) and enc[0]["confidence"] == pytest.approx(1.0)
    # decoder: rows 1 ... 4 and 1 ... 2 (row 0 sees only <s> and is left out); no next position
    assert dec[0]["previous"] == pytest.approx(1.0) and dec[0]["next"] is None
    assert dec[1]["sink"] == pytest.approx(1.0) and dec[1]["previous"] == pytest.approx(2 / 6)
    assert dec[2]["same"] == pytest.approx(1.0) and dec[2]["sink"] == pytest.approx(0.0)
    assert dec[3]["entropy_normalized"] == pytest.approx(1.0)
    assert dec[3]["entropy"] == pytest.approx((math.log(2) + math.log(3) + math.log(4) + math.log(5)
                                               + math.log(2) + math.log(3)) / 6)
    # cross: 8 rows; no positional shares
    assert cross[0]["sink"] == pytest.approx(1.0) and cross[0]["previous"] is None
    assert cross[1]["punctuation"] == pytest.approx(1.0)
    assert cross[2]["confidence"] == pytest.approx(1.0) and cross[2]["sink"] == pytest.approx(0.0)
    assert cross[3]["entropy_normalized"] == pytest.approx(1.0)
    roles = {kind: [assign_role(kind, head) for head in stats[kind][0]] for kind in KINDS}
    assert roles == {"encoder": ["previous", "sink", "diffuse", "next"],
                     "decoder": ["previous", "sink", "same", "diffuse"],
                     "cross": ["sink", "punctuation", "alignment", "diffuse"]}


def test_padding_rows_do_not_count():
    """The two sentences batched together give the same figures as each added alone."""
    weights, src_lengths, tgt_lengths, src_punct, tgt_punct = hand_made_attention()
    together = StatisticsAccumulator({"encoder": 1, "decoder": 1, "cross": 1}, 4)
    together.add(weights, src_lengths, tgt_lengths, src_punct, tgt_punct)
    apart = StatisticsAccumulator({"encoder": 1, "decoder": 1, "cross": 1}, 4)
    for b in range(2):
        s, t = int(src_lengths[b]), int(tgt_lengths[b])
        alone = {"encoder": [weights["encoder"][0][b:b + 1, :, :s, :s]],
                 "decoder": [weights["decoder"][0][b:b + 1, :, :t, :t]],
                 "cross": [weights["cross"][0][b:b + 1, :, :t, :s]]}
        apart.add(alone, src_lengths[b:b + 1], tgt_lengths[b:b + 1], src_punct[b:b + 1, :s], tgt_punct[b:b + 1, :t])
    a, b = together.result(), apart.result()
    for kind in KINDS:
        for head_a, head_b in zip(a[kind][0], b[kind][0]):
            assert head_a.keys() == head_b.keys()
            for name, value in head_a.items():
                assert value == (None if head_b[name] is None else pytest.approx(head_b[name])), (kind, name)


@pytest.mark.parametrize("kind, stats, aer, best, role", [
    ("encoder", {"previous": 0.6, "same": 0.3, "next": 0.1, "sink": 0.7}, None, None, "previous"),
    ("encoder", {"previous": 0.5, "same": 0.55, "sink": 0.0}, None, None, "same"),
    ("decoder", {"previous": 0.2, "same": 0.2, "sink": 0.5, "punctuation": 0.6}, None, None, "sink"),
    ("encoder", {"previous": 0.2, "sink": 0.1, "punctuation": 0.5, "entropy_normalized": 0.9}, None, None,
     "punctuation"),
    ("cross", {"sink": 0.2, "confidence": 0.5, "entropy_normalized": 0.9}, None, None, "alignment"),
    ("cross", {"sink": 0.3, "confidence": 0.9, "entropy_normalized": 0.9}, None, None, "diffuse"),
    ("cross", {"sink": 0.2, "confidence": 0.9, "entropy_normalized": 0.5}, 0.44, 0.4, "alignment"),
    ("cross", {"sink": 0.2, "confidence": 0.9, "entropy_normalized": 0.5}, 0.46, 0.4, "mixed"),
    ("cross", {"sink": 0.2, "confidence": 0.9, "entropy_normalized": 0.5}, None, 0.4, "mixed"),
    ("decoder", {"previous": 0.3, "same": 0.3, "sink": 0.3, "entropy_normalized": 0.79}, None, None, "mixed"),
])
def test_role_rules(kind, stats, aer, best, role):
    assert assign_role(kind, stats, aer, best) == role


@pytest.mark.parametrize("piece, punctuation", [
    ("▁.", True), (",", True), ("▁«", True), ("?!", True), ("▁", False), ("▁the", False), ("a.", False),
    ("</s>", False), ("-", True), ("+", False),
])
def test_punctuation_pieces(piece, punctuation):
    assert is_punctuation(piece) is punctuation


# -- on a checkpoint -------------------------------------------------------------------------------


@pytest.fixture
def parallel(tmp_path):
    """TEXT as source and reference (a blank pair in between), and a Pharaoh file linking each word to itself."""
    lines = TEXT[:3] + [""] + TEXT[3:]
    src, ref, links = tmp_path / "in.src", tmp_path / "in.ref", tmp_path / "in.align"
    src.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    ref.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    links.write_text("".join(" ".join(f"{i}-{i}" for i in range(len(line.split()))) + "\n" for line in lines),
                     encoding="utf-8")
    return src, ref, links


def test_read_inputs_takes_the_first_pairs_and_their_alignments(parallel):
    src, ref, links = parallel
    inputs = read_inputs(src, ref, links, max_sentences=4)
    assert inputs.lines == [1, 2, 3, 5] and inputs.sources == TEXT[:4] and inputs.references == TEXT[:4]
    assert inputs.links[3] == [(i, i) for i in range(len(TEXT[3].split()))]


def test_statistics_do_not_depend_on_the_batching(random_checkpoint, parallel):
    src, ref, _ = parallel
    inputs = read_inputs(src, ref, max_sentences=6)
    one = measure_heads(load_checkpoint(random_checkpoint), inputs, importance=False, batch_size=1)
    all_ = measure_heads(load_checkpoint(random_checkpoint), inputs, importance=False, batch_size=6)
    for kind in KINDS:
        for layer_one, layer_all in zip(one["heads"][kind], all_["heads"][kind]):
            for a, b in zip(layer_one, layer_all):
                for name in ("previous", "same", "next", "sink", "punctuation", "entropy", "entropy_normalized",
                             "confidence"):
                    assert a[name] == (None if b[name] is None else pytest.approx(b[name], abs=1e-5)), (kind, name)


def test_a_head_that_attends_along_the_alignment_is_found(random_checkpoint, parallel, monkeypatch):
    """Cross head 3 of layer 2 made to attend, on each target subword's row (the row alignments
    read: `ALIGNMENT_ROWS`), to the same source subword (source = reference): its word alignment
    is the identity, AER 0 against identity links."""
    src, ref, links = parallel
    ckpt = load_checkpoint(random_checkpoint)
    model = ckpt.model
    original = model.attention_weights

    def aligned(src_ids, tgt_in):
        weights = original(src_ids, tgt_in)
        cross = weights["cross"][1]
        for b in range(src_ids.size(0)):
            n_tgt = int(tgt_in[b].ne(0).sum()) - 1
            first = 1 if ALIGNMENT_ROWS == "reads" else 0  # the row of target subword 0
            cross[b, 2] = 0.0
            cross[b, 2, :, 0] = 1.0  # the rows alignments do not read: anywhere
            for k in range(n_tgt):
                cross[b, 2, first + k] = 0.0
                cross[b, 2, first + k, k] = 1.0
        return weights

    monkeypatch.setattr(model, "attention_weights", aligned)
    doc = measure_heads(ckpt, read_inputs(src, ref, links, max_sentences=6), importance=False, batch_size=4)
    assert doc["heads"]["cross"][1][2]["alignment"]["aer"] == 0.0
    assert doc["alignment_best"] == {"layer": 2, "head": 3, "aer": 0.0}
    assert doc["roles"]["cross"][1][2] == "alignment"
    assert [entry["layer"] for entry in doc["alignment_layer_mean"]] == [1, 2]
    assert all(0.0 <= entry["aer"] <= 1.0 for entry in doc["alignment_layer_mean"])


# -- the command -----------------------------------------------------------------------------------

FAST = ["--beam", "1", "--max-len-b", "6", "--precision", "fp32"]


@pytest.fixture(scope="module")
def one_layer_checkpoint(tmp_path_factory):
    """A random 1+1-layer model with 2 heads: 6 heads in all, so 13 searches measure their importance."""
    from aiayn.checkpoint import save_checkpoint
    from aiayn.data.tokenizer import Tokenizer, train_bpe
    from aiayn.model import Transformer, TransformerConfig

    root = tmp_path_factory.mktemp("heads-ckpt")
    train_bpe(TEXT * 20, root / "spm", vocab_size=60)
    torch.manual_seed(0)
    cfg = TransformerConfig(src_vocab_size=Tokenizer.load(root / "spm.model").vocab_size, d_model=16, d_ff=32,
                            n_heads=2, n_encoder_layers=1, n_decoder_layers=1, positions="learned", max_positions=64)
    return save_checkpoint(root / "model", Transformer(cfg), root / "spm.model", {"step": 0})


def test_heads_command_writes_json_markdown_and_picture(one_layer_checkpoint, parallel, tmp_path, capsys):
    src, ref, links = parallel
    out = tmp_path / "heads"
    argv = ["heads", "--checkpoint", str(one_layer_checkpoint), "--src", str(src), "--ref", str(ref),
            "--alignments", str(links), "--out", str(out), "--max-sentences", "3", *FAST]
    assert main(argv) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out / name) for name in ("heads.json", "heads.md", "heads.png")]
    doc = json.loads((out / "heads.json").read_text(encoding="utf-8"))
    assert doc["format"] == "aiayn-heads" and doc["sentences"] == 3 and doc["target"] == "reference"
    assert doc["search"]["beam"] == 1 and doc["layers"] == {"encoder": 1, "decoder": 1, "cross": 1}
    n = 3 * 1 * 2
    assert len(doc["importance"]["order"]) == n and len(doc["importance"]["pruning"]) == n + 1
    assert 0 <= doc["importance"]["prunable_heads"] <= n
    assert doc["alignment_best"]["layer"] == 1 and doc["alignment_best"]["head"] in (None, 1, 2)
    for kind in KINDS:
        assert [len(layer) for layer in doc["roles"][kind]] == [2]
        for layer in doc["heads"][kind]:
            for entry in layer:
                assert entry["delta_nll"] == pytest.approx(entry["nll"] - doc["importance"]["baseline"]["nll"], abs=1e-5)
                assert (entry["alignment"] is not None) == (kind == "cross")
    # the last pruning step masks every head
    assert {(s["kind"], s["layer"], s["head"]) for s in doc["importance"]["pruning"][1:]} == {
        (kind, 1, head) for kind in KINDS for head in (1, 2)}
    md = (out / "heads.md").read_text(encoding="utf-8")
    assert "## Encoder-decoder attention" in md and "| pruned | head added |" in md and "AER" in md
    assert (out / "heads.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # never replaced silently; --force replaces
    assert main(argv) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main([*argv, "--force", "--no-importance"]) == 0
    assert json.loads((out / "heads.json").read_text(encoding="utf-8"))["importance"] is None


def test_heads_command_without_references_reads_the_models_translations(random_checkpoint, parallel, tmp_path,
                                                                         capsys):
    src, _, _ = parallel
    out = tmp_path / "heads"
    assert main(["heads", "--checkpoint", str(random_checkpoint), "--src", str(src), "--out", str(out),
                 "--max-sentences", "2", *FAST]) == 0
    assert "needs --ref: skipped" in capsys.readouterr().err
    doc = json.loads((out / "heads.json").read_text(encoding="utf-8"))
    assert doc["target"] == "translation" and doc["importance"] is None and doc["alignment_best"] is None
    assert (out / "heads.png").is_file() and (out / "heads.md").is_file()


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("aiayn: error: "), captured.err
    return lines[0].removeprefix("aiayn: error: ")


@pytest.mark.parametrize("case", ["missing", "empty", "short_ref", "utf8", "max_sentences", "align_without_ref",
                                  "align_malformed", "align_short", "align_long", "align_range", "not_ours"])
def test_heads_errors_are_one_line(case, random_checkpoint, parallel, tmp_path, capsys):
    src, ref, links = parallel
    out = tmp_path / "out"
    options = ["--ref", str(ref)]
    if case == "missing":
        src = tmp_path / "nope.txt"
        expected = f"{src}: file not found"
    elif case == "empty":
        ref.write_text("\n\n", encoding="utf-8")
        expected = f"{ref}: file is empty"
    elif case == "short_ref":
        ref.write_text("".join(line + "\n" for line in TEXT[:2]), encoding="utf-8")
        expected = f"{src}:3: line has no counterpart: {src} has 7 lines, {ref} has 2"
    elif case == "utf8":
        src.write_bytes(b"the cat\nthe \xff dog\n" + b"a\n" * 5)
        expected = f"{src}:2: invalid UTF-8"
    elif case == "max_sentences":
        options += ["--max-sentences", "0"]
        expected = "--max-sentences must be at least 1 (got 0)"
    elif case == "align_without_ref":
        options = ["--alignments", str(links)]
        expected = "--alignments needs --ref"
    elif case == "align_malformed":
        text = links.read_text(encoding="utf-8").split("\n")
        text[1] = "0-0 1:1"
        links.write_text("\n".join(text), encoding="utf-8")
        options += ["--alignments", str(links)]
        expected = f"{links}:2: '1:1' is not an alignment link"
    elif case == "align_short":
        links.write_text("0-0\n" * 6, encoding="utf-8")
        options += ["--alignments", str(links)]
        expected = f"{links}:7: the file ends here: it has 6 lines, {src} has 7"
    elif case == "align_long":
        links.write_text("0-0\n" * 8, encoding="utf-8")
        options += ["--alignments", str(links)]
        expected = f"{links}:8: line has no sentence pair"
    elif case == "align_range":
        links.write_text("0-0 9-0\n" + "0-0\n" * 6, encoding="utf-8")
        options += ["--alignments", str(links)]
        expected = f"{links}:1: link 9-0 is outside the pair: its source has 6 words"
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        options += ["--force"]
        expected = f"{out}: is not a directory aiayn wrote (it holds notes.txt); --force replaces only aiayn head"
    argv = ["heads", "--checkpoint", str(random_checkpoint), "--src", str(src), *options, "--out", str(out), *FAST,
            "--no-importance"]
    assert main(argv) == 2
    assert one_error_line(capsys).startswith(expected)
    assert not out.exists() or case == "not_ours"
