"""Export aiayn weights to the Hugging Face Marian layout, for deployment elsewhere.

A checkpoint exported here loads with ``transformers.MarianMTModel.from_pretrained`` and
converts with CTranslate2's stock converter:

    aiayn export --checkpoint runs/demo/train/averaged --out runs/demo/marian
    ct2-transformers-converter --model runs/demo/marian --output_dir runs/demo/ct2 --quantization int8

Marian (Junczys-Dowmunt et al., 2018) is the paper's architecture with post-LN sublayers, ReLU
(when configured so), √d_model-scaled embeddings shared by encoder, decoder and output layer,
and sinusoidal positions. The layouts differ in three details; each is translated exactly, so
the exported model computes the same function (see tests/test_export.py):

1. Positions. Marian's sinusoids are *concatenated* (all sines, then all cosines); the paper's
   are *interleaved* (PE(pos, 2i) = sin, PE(pos, 2i+1) = cos). The positions are added to the
   embeddings, so no permutation of the model's dimensions can turn one into the other. But
   Marian keeps its table as a (frozen) weight, ``embed_positions.weight``, which
   ``from_pretrained`` and CTranslate2 read from the checkpoint: we write our table there.
2. The decoder's first input. aiayn feeds ``<s>`` (id 2): its input at position 0 is
   √d_model·E[<s>] + PE(0). Marian starts the decoder from a token whose embedding row is zero
   (HF: ``decoder_start_token_id`` = ``pad_token_id``, the last id; CTranslate2: the option
   ``start_from_zero_embedding``). So the export appends one zero row, named ``<pad>``, at id V
   (Marian's convention: pad is the last id) and folds √d_model·E[<s>] into the decoder's
   position-0 row. Position 0 is only ever the first step, so nothing else changes.
3. The output layer. Marian adds ``final_logits_bias``; the paper's model has no bias, so it is
   zero (an imported model's own bias, ``logits_bias``, is written back), except at the appended
   row, which gets the most negative float so it is never generated (the CTranslate2 converter
   drops that row and its bias entry altogether).

aiayn's own id 0 (its padding token) stays an ordinary row of the exported vocabulary, under
the name ``<aiayn_pad>``; the exported model pads with id V instead.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .data.tokenizer import BOS_ID, EOS_ID
from .errors import UserError
from .files import atomic_directory
from .model import Transformer, TransformerConfig

MARIAN_PAD = "<pad>"  # name of the appended zero row (Marian's pad and decoder start)
AIAYN_PAD = "<aiayn_pad>"  # name given to aiayn's own id 0 in the exported vocabulary


def check_exportable(cfg: TransformerConfig) -> None:
    """Marian can express the paper's model (post-LN, one shared vocabulary, d_k·h = d_model,
    scaled attention) with sinusoidal or learned positions; anything else (the ablations'
    unscaled attention or missing positions among it) has no Marian equivalent."""
    problems = []
    if cfg.norm_first:
        problems.append("pre-LN (norm_first=true): Marian is post-LN only")
    if cfg.tie_embeddings != "all" or cfg.src_vocab_size != cfg.tgt_vocab_size:
        problems.append("separate vocabularies or untied embeddings: the export needs tie_embeddings='all'")
    if cfg.d_k * cfg.n_heads != cfg.d_model:
        problems.append(f"d_k·h = {cfg.d_k * cfg.n_heads} != d_model {cfg.d_model}: Marian's heads split d_model")
    if not cfg.attention_scale:
        problems.append("attention without the 1/√d_k scale (attention_scale=false): Marian always scales")
    if cfg.positions == "none":
        problems.append("no positional encoding (positions=none): Marian always adds positions")
    if problems:
        raise UserError("cannot export to the Marian layout: " + "; ".join(problems))


def marian_config_dict(cfg: TransformerConfig, max_positions: int) -> dict:
    """The ``config.json`` of the exported model (vocabulary: ours plus the appended pad row)."""
    vocab = cfg.src_vocab_size + 1
    pad = cfg.src_vocab_size
    return {
        "architectures": ["MarianMTModel"],
        "model_type": "marian",
        "vocab_size": vocab,
        "decoder_vocab_size": vocab,
        "share_encoder_decoder_embeddings": True,
        "tie_word_embeddings": True,
        "d_model": cfg.d_model,
        "encoder_layers": cfg.n_encoder_layers,
        "decoder_layers": cfg.n_decoder_layers,
        "encoder_attention_heads": cfg.n_heads,
        "decoder_attention_heads": cfg.n_heads,
        "encoder_ffn_dim": cfg.d_ff,
        "decoder_ffn_dim": cfg.d_ff,
        "activation_function": cfg.activation,  # relu, swish or gelu: the same names in transformers
        "dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "activation_dropout": cfg.activation_dropout,
        "max_position_embeddings": max_positions,
        "scale_embedding": True,  # §3.4: embeddings × √d_model
        "pad_token_id": pad,
        "decoder_start_token_id": pad,
        "eos_token_id": EOS_ID,
        "bos_token_id": BOS_ID,
        "forced_eos_token_id": None,
        "is_encoder_decoder": True,
        "use_cache": True,
        "dtype": "float32",
    }


def generation_config_dict(cfg: TransformerConfig) -> dict:
    """Defaults for ``generate``: the paper's beam 4; no forced tokens."""
    pad = cfg.src_vocab_size
    return {
        "decoder_start_token_id": pad,
        "pad_token_id": pad,
        "eos_token_id": EOS_ID,
        "bos_token_id": BOS_ID,
        "forced_eos_token_id": None,
        "num_beams": 4,
        "max_length": 512,
    }


def _positions(model: Transformer, which: str, length: int) -> torch.Tensor:
    """Our positional table (sinusoidal or learned) for positions 0 .. length-1."""
    module = getattr(model, which).positions
    return module(length, 0).detach().float().clone()


@torch.no_grad()
def marian_state_dict(model: Transformer, max_positions: int | None = None) -> dict[str, torch.Tensor]:
    """Map aiayn parameter names and tensors to MarianMTModel's (see the module docstring)."""
    cfg = model.config
    check_exportable(cfg)
    if max_positions is None:
        max_positions = cfg.max_positions
    d = cfg.d_model
    emb = model.src_embed.token.weight.detach().float()
    shared = torch.cat([emb, emb.new_zeros(1, d)])  # row V: Marian's zero-embedding pad/start
    sd: dict[str, torch.Tensor] = {
        "model.shared.weight": shared,
        "model.encoder.embed_tokens.weight": shared,
        "model.decoder.embed_tokens.weight": shared,
        "lm_head.weight": shared,
    }
    bias = torch.zeros(1, cfg.tgt_vocab_size + 1)
    if model.generator.bias is not None:  # a pretrained model's logits bias (aiayn.pretrained)
        bias[0, :-1] = model.generator.bias.detach().float()
    bias[0, -1] = torch.finfo(torch.float32).min  # the appended row is never an output
    sd["final_logits_bias"] = bias

    sd["model.encoder.embed_positions.weight"] = _positions(model, "src_embed", max_positions)
    dec_pos = _positions(model, "tgt_embed", max_positions)
    dec_pos[0] += math.sqrt(d) * emb[BOS_ID]  # step 0: zero embedding + (PE(0) + √d·E[<s>])
    sd["model.decoder.embed_positions.weight"] = dec_pos

    for i, layer in enumerate(model.encoder.layers):
        p = f"model.encoder.layers.{i}."
        _self_attention(sd, p + "self_attn.", layer.self_attn, d)
        _norm(sd, p + "self_attn_layer_norm.", layer.sublayers[0].norm)
        _ffn(sd, p, layer.ffn)
        _norm(sd, p + "final_layer_norm.", layer.sublayers[1].norm)
    for i, layer in enumerate(model.decoder.layers):
        p = f"model.decoder.layers.{i}."
        _self_attention(sd, p + "self_attn.", layer.self_attn, d)
        _norm(sd, p + "self_attn_layer_norm.", layer.sublayers[0].norm)
        _cross_attention(sd, p + "encoder_attn.", layer.cross_attn, d)
        _norm(sd, p + "encoder_attn_layer_norm.", layer.sublayers[1].norm)
        _ffn(sd, p, layer.ffn)
        _norm(sd, p + "final_layer_norm.", layer.sublayers[2].norm)
    return {k: v.detach().float().contiguous() for k, v in sd.items()}


def _linear(sd: dict, prefix: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
    sd[prefix + "weight"], sd[prefix + "bias"] = weight, bias


def _self_attention(sd: dict, prefix: str, attn, d: int) -> None:
    # Our fused W^{QKV} stacks the Q, K and V blocks (d rows each, heads side by side within a
    # block), which is exactly Marian's q_proj, k_proj, v_proj one after another.
    w, b = attn.qkv_proj.weight, attn.qkv_proj.bias
    for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
        _linear(sd, f"{prefix}{name}.", w[j * d : (j + 1) * d], b[j * d : (j + 1) * d])
    _linear(sd, prefix + "out_proj.", attn.out_proj.weight, attn.out_proj.bias)


def _cross_attention(sd: dict, prefix: str, attn, d: int) -> None:
    _linear(sd, prefix + "q_proj.", attn.q_proj.weight, attn.q_proj.bias)
    w, b = attn.kv_proj.weight, attn.kv_proj.bias
    _linear(sd, prefix + "k_proj.", w[:d], b[:d])
    _linear(sd, prefix + "v_proj.", w[d:], b[d:])
    _linear(sd, prefix + "out_proj.", attn.out_proj.weight, attn.out_proj.bias)


def _ffn(sd: dict, prefix: str, ffn) -> None:
    _linear(sd, prefix + "fc1.", ffn.w1.weight, ffn.w1.bias)
    _linear(sd, prefix + "fc2.", ffn.w2.weight, ffn.w2.bias)


def _norm(sd: dict, prefix: str, norm) -> None:
    _linear(sd, prefix, norm.weight, norm.bias)


def vocabulary(spm_file: Path, vocab_size: int) -> dict[str, int]:
    """vocab.json: subword piece -> id, for our V ids and the appended pad.

    Rows beyond the subword model's pieces (a vocabulary padded for speed, or a benchmark model
    with random weights) are named ``<unused_N>``: they are never produced by the tokenizer.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(spm_file))
    except (OSError, RuntimeError) as e:
        raise UserError(f"not a sentencepiece model ({e})", path=spm_file) from None
    n = sp.get_piece_size()
    if n > vocab_size:
        raise UserError(f"the subword model has {n} pieces but the model only {vocab_size} rows", path=spm_file)
    pieces = [sp.id_to_piece(i) for i in range(n)] + [f"<unused_{i}>" for i in range(n, vocab_size)]
    pieces[0] = AIAYN_PAD
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if len(vocab) != vocab_size or MARIAN_PAD in vocab:
        raise UserError("subword pieces are not unique, or one is named <pad> beyond id 0", path=spm_file)
    vocab[MARIAN_PAD] = vocab_size
    return vocab


def pair_vocabulary(tokenizer, vocab_size: int) -> dict[str, int]:
    """vocab.json of an imported (pair-tokenizer) model: its own map, id 0 named as `vocabulary`
    names it, and the appended pad."""
    names = dict(tokenizer.id_to_piece)
    names[0] = AIAYN_PAD
    if len(names) != vocab_size or MARIAN_PAD in names.values():
        raise UserError(f"the tokenizer has {len(names)} ids but the model {vocab_size} rows, or a piece named <pad>")
    vocab = {piece: i for i, piece in names.items()}
    vocab[MARIAN_PAD] = vocab_size
    return vocab


def write_marian_files(directory: Path, model: Transformer, tokenizer, max_positions: int | None = None) -> None:
    """Write config.json, generation_config.json, model.safetensors and the MarianTokenizer files
    (vocab.json, source.spm, target.spm, tokenizer_config.json) into ``directory``.
    ``tokenizer``: the model's (`aiayn.data.tokenizer`: aiayn's joint model, or an imported
    pair), or the path of its spm.model."""
    cfg = model.config
    sd = marian_state_dict(model, max_positions)
    n_pos = sd["model.encoder.embed_positions.weight"].size(0)
    # One tensor per name: safetensors refuses shared storage, and HF re-ties the embeddings.
    save_file({k: v.clone() for k, v in sd.items()}, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(marian_config_dict(cfg, n_pos), indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(generation_config_dict(cfg), indent=2) + "\n")
    if isinstance(tokenizer, (str, Path)):
        vocab = vocabulary(Path(tokenizer), cfg.src_vocab_size)
        shutil.copyfile(tokenizer, directory / "source.spm")
        shutil.copyfile(tokenizer, directory / "target.spm")
    elif hasattr(tokenizer, "id_to_piece"):  # a pair (an imported model)
        vocab = pair_vocabulary(tokenizer, cfg.src_vocab_size)
        (directory / "source.spm").write_bytes(tokenizer.spm["src"].serialized_model_proto())
        (directory / "target.spm").write_bytes(tokenizer.spm["tgt"].serialized_model_proto())
    else:
        (directory / "source.spm").write_bytes(tokenizer.sp.serialized_model_proto())
        shutil.copyfile(directory / "source.spm", directory / "target.spm")
        vocab = vocabulary(directory / "source.spm", cfg.src_vocab_size)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tokenizer_config = {
        "tokenizer_class": "MarianTokenizer",
        "source_lang": None,
        "target_lang": None,
        "separate_vocabs": False,
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": MARIAN_PAD,
        "model_max_length": n_pos,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def export_marian(
    model: Transformer, out: str | Path, tokenizer, *, force: bool = False, max_positions: int | None = None
) -> Path:
    """Write the Marian export of ``model`` to the directory ``out`` (atomically); ``tokenizer``
    as in `write_marian_files`."""
    out = Path(out)
    with atomic_directory(out, kind="export", force=force) as tmp:
        write_marian_files(tmp, model, tokenizer, max_positions)
    return out


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """An aiayn checkpoint directory -> a Hugging Face Marian directory."""
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    return export_marian(ckpt.model, out, ckpt.tokenizer, force=force)

