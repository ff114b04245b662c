"""Start from a pretrained model: a Hugging Face Marian directory (OPUS-MT) -> an aiayn checkpoint.

    aiayn import --marian opus-mt-en-de/ --out models/opus-mt-en-de

The directory is the layout ``transformers.MarianMTModel.save_pretrained`` and the OPUS-MT
releases use: ``config.json``, the weights (``model.safetensors``, or ``pytorch_model.bin``, read
only through ``torch.load(weights_only=True)``, which never runs code), and the tokenizer files
``source.spm``, ``target.spm``, ``vocab.json`` and ``tokenizer_config.json``. Nothing is
downloaded: you bring the directory (the models' licences are their authors').

Marian is the paper's architecture (post-LN, √d_model-scaled embeddings, sinusoids, one
vocabulary shared by the encoder, the decoder and the output layer) with these differences,
each of which becomes a setting of the aiayn model, documented as a deviation from the paper
(`aiayn.model.TransformerConfig`):

- the FFN's activation: ``swish`` (SiLU) in OPUS-MT, sometimes ``gelu``: ``activation``;
- a bias on the logits, ``final_logits_bias``: ``logits_bias`` (kept fixed in fine-tuning,
  as Hugging Face keeps it);
- the sinusoids concatenated (all sines, then all cosines) instead of interleaved:
  ``sinusoid_layout: concatenated`` (checked against the tables in the weights when present);
- the special ids. Marian has eos 0 and unk 1, pads with its last id and starts the decoder
  from that pad token (``decoder_start_token_id``). aiayn's ids are fixed (pad 0, unk 1,
  bos 2, eos 3), so the import renumbers the vocabulary: id 0 becomes a new zero row (padding,
  never an input the model sees unmasked), 1 is Marian's ``<unk>``, 2 (aiayn's decoder start) is
  Marian's decoder-start row, 3 is Marian's ``</s>``, and every other piece follows in Marian's
  order (Marian id k >= 2 becomes k + 2, its pad excepted). The tokenizer carries the same
  renumbering, so text in and text out are Marian's. A model that aiayn exported
  (`aiayn.export`) comes back with its own ids and weights;
- the maximum length (``max_position_embeddings``): ``max_positions``;
- separate source and target vocabularies (``share_encoder_decoder_embeddings: false``,
  ``decoder_vocab_size``, the tokenizer's ``separate_vocabs`` with ``target_vocab.json``): separate
  embeddings, ``tie_embeddings: decoder``; an output layer untied from the decoder's embeddings
  (``tie_word_embeddings: false``): ``tie_embeddings: none`` (with one shared vocabulary, the
  encoder and decoder then get equal copies of the shared matrix).

Anything else (pre-LN, different encoder and decoder widths, learned positions, unscaled
embeddings) is a one-line error naming the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, PairTokenizer
from .errors import UserError
from .files import atomic_directory
from .model import Transformer, TransformerConfig, sinusoidal_table

ACTIVATIONS = {"relu": "relu", "swish": "swish", "silu": "swish", "gelu": "gelu"}
SPECIAL_NAMES = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}
AIAYN_PAD = "<aiayn_pad>"  # what `aiayn.export` names aiayn's id 0


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise UserError("not found (a Hugging Face Marian directory has config.json, the weights, source.spm, "
                        "target.spm and vocab.json)", path=path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"invalid JSON: {e.msg}", path=path, line=e.lineno) from None
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 ({e.reason})", path=path) from None
    if not isinstance(data, dict):
        raise UserError("expected a JSON object", path=path)
    return data


def marian_config(directory: Path) -> tuple[dict, TransformerConfig]:
    """config.json -> (the raw dict, the aiayn model config it describes; vocabulary sizes are
    the renumbered ones). Unsupported settings are a UserError naming the field."""
    file = directory / "config.json"
    c = _read_json(file)

    def field(name: str, default=None, required: bool = True):
        if name not in c:
            if required and default is None:
                raise UserError(f"field {name!r} is missing", path=file)
            return default
        return c[name]

    def unsupported(name: str, why: str):
        raise UserError(f"field {name!r} = {json.dumps(c.get(name))}: {why}", path=file)

    if c.get("model_type") != "marian":
        unsupported("model_type", "only Marian models (model_type \"marian\") can be imported")
    activation = ACTIVATIONS.get(str(field("activation_function", "relu")))
    if activation is None:
        unsupported("activation_function", f"supported: {', '.join(sorted(ACTIVATIONS))}")
    if not field("scale_embedding", False):
        unsupported("scale_embedding", "aiayn scales embeddings by √d_model (§3.4), as OPUS-MT models do")
    if c.get("normalize_before"):
        unsupported("normalize_before", "Marian models are post-LN")
    for name in ("normalize_embedding", "add_final_layer_norm", "static_position_embeddings"):
        if c.get(name):
            unsupported(name, "not part of Marian's architecture")
    if field("encoder_ffn_dim") != field("decoder_ffn_dim"):
        unsupported("decoder_ffn_dim", f"differs from encoder_ffn_dim {c['encoder_ffn_dim']}: aiayn has one d_ff")
    if field("encoder_attention_heads") != field("decoder_attention_heads"):
        unsupported("decoder_attention_heads", "differs from encoder_attention_heads: aiayn has one h")
    vocab = int(field("vocab_size"))
    target_vocab = int(c.get("decoder_vocab_size") or vocab)
    separate = c.get("share_encoder_decoder_embeddings") is False
    if target_vocab != vocab and not separate:
        unsupported("decoder_vocab_size", f"differs from vocab_size {vocab} with share_encoder_decoder_embeddings true")
    tied = c.get("tie_word_embeddings") is not False
    # One matrix for all three (the paper's §3.4), the target embedding as the output layer, or
    # three: a shared input embedding with its own output layer becomes two equal copies.
    tie = "all" if tied and not separate else ("decoder" if tied else "none")
    d_model, heads = int(field("d_model")), int(field("encoder_attention_heads"))
    if d_model % heads:
        unsupported("encoder_attention_heads", f"does not divide d_model {d_model}")
    pad, eos = int(field("pad_token_id")), int(field("eos_token_id"))
    start = int(c.get("decoder_start_token_id", pad) if c.get("decoder_start_token_id") is not None else pad)
    if start != pad:
        unsupported("decoder_start_token_id", f"differs from pad_token_id {pad}; Marian starts from the pad token")
    for name, value in (("pad_token_id", pad), ("eos_token_id", eos)):
        if not 0 <= value < min(vocab, target_vocab):
            unsupported(name, f"outside the vocabulary of {min(vocab, target_vocab)}")
    cfg = TransformerConfig(
        src_vocab_size=vocab + 1, tgt_vocab_size=target_vocab + 1, d_model=d_model, d_ff=int(field("encoder_ffn_dim")), n_heads=heads,
        n_encoder_layers=int(field("encoder_layers")), n_decoder_layers=int(field("decoder_layers")),
        dropout=float(c.get("dropout", 0.1)), attention_dropout=float(c.get("attention_dropout", 0.0)),
        activation_dropout=float(c.get("activation_dropout", 0.0)), norm_first=False, positions="sinusoidal",
        max_positions=int(field("max_position_embeddings", 512)), tie_embeddings=tie,
        activation=activation, logits_bias=True, sinusoid_layout="concatenated")
    return c, cfg


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The weights of a Marian directory: model.safetensors, else pytorch_model.bin loaded with
    ``weights_only=True`` (tensors only: a pickle that would run code is refused)."""
    safetensors_file, bin_file = directory / "model.safetensors", directory / "pytorch_model.bin"
    if safetensors_file.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(safetensors_file))
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read the weights ({e})", path=safetensors_file) from None
    elif bin_file.is_file():
        try:
            sd = torch.load(bin_file, map_location="cpu", weights_only=True)
        except Exception as e:  # an unpickling error: the file holds more than tensors, or is corrupt
            raise UserError(f"cannot read the weights with torch.load(weights_only=True): "
                            f"{str(e).strip().splitlines()[0]}", path=bin_file) from None
        if not isinstance(sd, dict):
            raise UserError("does not hold a state dict", path=bin_file)
    else:
        raise UserError("no model.safetensors or pytorch_model.bin", path=directory)
    # MarianMTModel's names start with "model." (and has lm_head/final_logits_bias); MarianModel's do not.
    return {k.removeprefix("model."): v.float() for k, v in sd.items()}


def _layout(table: torch.Tensor, d_model: int) -> tuple[str, torch.Tensor | None]:
    """Which sinusoid layout a stored position table is (rows from 1 on; row 0 of the decoder may
    hold an exported model's folded start embedding), and its row-0 difference from that layout."""
    n = table.size(0)
    for layout in ("concatenated", "interleaved"):
        expected = sinusoidal_table(n, d_model, layout)
        if torch.allclose(table[1:], expected[1:], atol=1e-4, rtol=0):
            return layout, table[0] - expected[0]
    raise UserError("the position table is not sinusoidal (learned positions cannot be imported yet)")


def _renumbering(vocab: dict[str, int], size: int, pad: int, eos: int) -> tuple[list[int], bool]:
    """For each aiayn id, the Marian id whose row it takes (-1: a new zero row), and whether the
    vocabulary is an aiayn export's (then its ids are kept; only the appended pad row goes)."""
    by_id = {i: piece for piece, i in vocab.items()}
    exported = (by_id.get(0) == AIAYN_PAD and by_id.get(UNK_ID) == "<unk>" and by_id.get(BOS_ID) == "<s>"
                and by_id.get(EOS_ID) == "</s>" and eos == EOS_ID and pad == size - 1)
    if exported:
        return list(range(size - 1)), True
    unk = vocab.get("<unk>")
    if unk is None:
        raise UserError("vocab.json has no <unk> piece")
    rest = [i for i in range(size) if i not in (unk, eos, pad)]
    return [-1, unk, pad, eos, *rest], False


def import_marian(directory: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Write the aiayn checkpoint of a Hugging Face Marian directory to ``out`` (atomically)."""
    from .checkpoint import write_checkpoint_files
    from .files import refuse_to_replace

    directory = Path(directory)
    if not directory.is_dir():
        raise UserError("not a directory (give a Hugging Face Marian model directory)", path=directory)
    refuse_to_replace(Path(out), force, kind="checkpoint")  # before the work; checked again when written
    raw, cfg = marian_config(directory)
    separate_vocabs = (directory / "tokenizer_config.json").is_file() and bool(
        _read_json(directory / "tokenizer_config.json").get("separate_vocabs"))
    if separate_vocabs != (cfg.tie_embeddings != "all" and raw.get("share_encoder_decoder_embeddings") is False):
        raise UserError(f"tokenizer_config.json says separate_vocabs {str(separate_vocabs).lower()}, config.json "
                        f"share_encoder_decoder_embeddings {raw.get('share_encoder_decoder_embeddings')}: they "
                        "must agree", path=directory)
    vocab = _read_json(directory / "vocab.json")
    target_vocab = _read_json(directory / "target_vocab.json") if separate_vocabs else vocab
    size, target_size = cfg.src_vocab_size - 1, cfg.tgt_vocab_size - 1
    for name, v, n in (("vocab.json", vocab, size), ("target_vocab.json", target_vocab, target_size)):
        if sorted(v.values()) != list(range(n)):
            raise UserError(f"does not number its pieces 0 .. {n - 1} (config.json says {n})", path=directory / name)
    for name in ("source.spm", "target.spm"):
        if not (directory / name).is_file():
            raise UserError("not found (Marian's tokenizer needs source.spm and target.spm)", path=directory / name)
    pad, eos = int(raw["pad_token_id"]), int(raw["eos_token_id"])
    order, exported = _renumbering(vocab, size, pad, eos)
    target_order = _renumbering(target_vocab, target_size, pad, eos)[0] if separate_vocabs else order
    if exported and not separate_vocabs:
        cfg = TransformerConfig(**{**cfg.to_dict(), "src_vocab_size": size - 1, "tgt_vocab_size": size - 1})
    sd = read_weights(directory)
    model = Transformer(cfg)
    _load_marian_weights(model, sd, order, target_order, pad, directory)
    if not bool(model.generator.bias.detach().any()):  # no bias of its own (e.g. an aiayn export)
        model = _without_logits_bias(model)
    tokenizer = _tokenizer(directory, vocab, order, exported and not separate_vocabs,
                           (target_vocab, target_order) if separate_vocabs else None)
    meta = {"imported_from": {"format": "huggingface-marian", "directory": directory.name,
                              "name_or_path": raw.get("_name_or_path") or None,
                              "vocabulary": "kept (an aiayn export)" if exported else "renumbered (aiayn.pretrained)"},
            "search": {"beam": int(raw.get("num_beams") or 4), "alpha": 0.6}}
    with atomic_directory(out, kind="checkpoint", force=force) as tmp:
        write_checkpoint_files(tmp, model, tokenizer, meta)
    return Path(out)


def _without_logits_bias(model: Transformer) -> Transformer:
    """The same model with ``logits_bias`` off (its bias was zero)."""
    plain = Transformer(TransformerConfig(**{**model.config.to_dict(), "logits_bias": False}))
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "generator.bias"})
    return plain


def _tokenizer(directory: Path, vocab: dict[str, int], order: list[int], exported: bool,
               target_side: tuple[dict[str, int], list[int]] | None = None):
    """The checkpoint's tokenizer: for an aiayn export whose two sentencepiece models are its own
    joint model (the same bytes, ids as in vocab.json), that joint model again; else the pair, with
    the renumbered ids and aiayn's names for ids 0-3 (a Marian piece that had one of those names
    becomes ``<marian_NAME>``), and ``target_side`` (the target's vocabulary and renumbering) for
    a model with separate vocabularies."""
    from .data.tokenizer import Tokenizer

    source, target = (directory / "source.spm").read_bytes(), (directory / "target.spm").read_bytes()
    if exported and source == target:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(source)
        same = all(sp.id_to_piece(i) == piece for piece, i in vocab.items() if 0 < i < sp.get_piece_size())
        if same and (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            return Tokenizer(sp)

    def renamed(vocab: dict[str, int], order: list[int]) -> dict[str, int]:
        by_id = {i: piece for piece, i in vocab.items()}
        names = [by_id[m] if m >= 0 else "" for m in order]
        for i, name in SPECIAL_NAMES.items():
            names[i] = name
        taken = set(SPECIAL_NAMES.values())
        names[4:] = [f"<marian_{n.strip('<>')}>" if n in taken else n for n in names[4:]]
        return {piece: i for i, piece in enumerate(names)}

    return PairTokenizer.from_files(directory / "source.spm", directory / "target.spm", renamed(vocab, order),
                                    None if target_side is None else renamed(*target_side))


@torch.no_grad()
def _load_marian_weights(model: Transformer, sd: dict[str, torch.Tensor], order: list[int], target_order: list[int],
                         start: int, where: Path) -> None:
    """Copy Marian's tensors into ``model``, renumbering the vocabulary by ``order`` (the source
    side's) and ``target_order`` (the target side's: the same list with one vocabulary)."""
    cfg = model.config
    d = cfg.d_model

    def take(name: str) -> torch.Tensor:
        if name not in sd:
            raise UserError(f"the weights have no tensor {name!r}", path=where)
        return sd[name]

    def rows(matrix: torch.Tensor, order: list[int] = order) -> torch.Tensor:
        index = torch.tensor([max(i, 0) for i in order])
        out = matrix.index_select(0, index).clone()
        out[torch.tensor([i < 0 for i in order])] = 0
        return out

    def matrix(*names: str, size: int) -> torch.Tensor:
        found = next((sd[n] for n in names if n in sd), None)
        if found is None:
            raise UserError(f"the weights have no {names[0]}", path=where)
        if found.size(1) != d or found.size(0) < size:
            raise UserError(f"{names[0]} has shape {tuple(found.shape)}; config.json says d_model {d} and "
                            f"{size} rows", path=where)
        return found

    separate = cfg.tie_embeddings != "all"
    source = matrix("encoder.embed_tokens.weight", "shared.weight", size=max(order) + 1)
    target = matrix("decoder.embed_tokens.weight", "shared.weight", size=max(target_order) + 1)
    output = matrix("lm_head.weight", "decoder.embed_tokens.weight", "shared.weight", size=max(target_order) + 1)
    if not separate:
        for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
            if name in sd and "shared.weight" in sd and not torch.equal(sd[name], sd["shared.weight"]):
                raise UserError(f"{name} differs from shared.weight, but config.json ties them", path=where)
    elif cfg.tie_embeddings == "decoder" and not torch.equal(output, target):
        raise UserError("lm_head.weight differs from decoder.embed_tokens.weight, but tie_word_embeddings is true",
                        path=where)
    shared = target
    emb = rows(target, target_order)
    # The decoder's first input: Marian's start row plus what its position-0 row holds beyond
    # the sinusoid (an aiayn export folds √d·E[<s>] there); aiayn's BOS row carries both.
    for side, module in (("encoder", model.src_embed), ("decoder", model.tgt_embed)):
        table = sd.get(f"{side}.embed_positions.weight")
        if table is not None:
            layout, row0 = _layout(table, d)
            cfg.sinusoid_layout = layout
            module.positions.layout = layout
            module.positions.table = sinusoidal_table(module.positions.table.size(0), d, layout)
            if side == "decoder":
                bos = shared[start] + row0 / math.sqrt(d)
                # An aiayn export's BOS row is its own <s> again (kept exactly where it agrees).
                emb[BOS_ID] = emb[BOS_ID] if torch.allclose(emb[BOS_ID], bos, atol=1e-5) else bos
            elif side == "encoder" and row0.abs().max() > 1e-4:
                raise UserError("the encoder's position table is not sinusoidal at position 0", path=where)
    model.tgt_embed.token.weight.copy_(emb)  # with tie_embeddings "all": the one matrix
    if separate:
        model.src_embed.token.weight.copy_(rows(source))
    if cfg.tie_embeddings == "none":
        model.generator.weight.copy_(rows(output, target_order))
    bias = sd.get("final_logits_bias", torch.zeros(1, target.size(0))).reshape(-1)
    model.generator.bias.copy_(rows(bias[:, None], target_order)[:, 0])

    def linear(module, prefix: str) -> None:
        module.weight.copy_(take(prefix + "weight"))
        module.bias.copy_(take(prefix + "bias"))

    def norm(module, prefix: str) -> None:
        linear(module, prefix)

    def attention_qkv(attn, prefix: str) -> None:
        attn.qkv_proj.weight.copy_(torch.cat([take(f"{prefix}{n}_proj.weight") for n in "qkv"]))
        attn.qkv_proj.bias.copy_(torch.cat([take(f"{prefix}{n}_proj.bias") for n in "qkv"]))
        linear(attn.out_proj, prefix + "out_proj.")

    def attention_cross(attn, prefix: str) -> None:
        linear(attn.q_proj, prefix + "q_proj.")
        attn.kv_proj.weight.copy_(torch.cat([take(f"{prefix}{n}_proj.weight") for n in "kv"]))
        attn.kv_proj.bias.copy_(torch.cat([take(f"{prefix}{n}_proj.bias") for n in "kv"]))
        linear(attn.out_proj, prefix + "out_proj.")

    for i, layer in enumerate(model.encoder.layers):
        p = f"encoder.layers.{i}."
        attention_qkv(layer.self_attn, p + "self_attn.")
        norm(layer.sublayers[0].norm, p + "self_attn_layer_norm.")
        linear(layer.ffn.w1, p + "fc1.")
        linear(layer.ffn.w2, p + "fc2.")
        norm(layer.sublayers[1].norm, p + "final_layer_norm.")
    for i, layer in enumerate(model.decoder.layers):
        p = f"decoder.layers.{i}."
        attention_qkv(layer.self_attn, p + "self_attn.")
        norm(layer.sublayers[0].norm, p + "self_attn_layer_norm.")
        attention_cross(layer.cross_attn, p + "encoder_attn.")
        norm(layer.sublayers[1].norm, p + "encoder_attn_layer_norm.")
        linear(layer.ffn.w1, p + "fc1.")
        linear(layer.ffn.w2, p + "fc2.")
        norm(layer.sublayers[2].norm, p + "final_layer_norm.")
