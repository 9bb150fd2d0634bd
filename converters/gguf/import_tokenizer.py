"""Rebuild a Hugging Face tokenizer from a GGUF vocabulary (byte-level BPE or SentencePiece)."""

from __future__ import annotations

from pathlib import Path

import gguf

from converters.gguf.pretokenizers import build_pretokenizer
from edgepack.core.errors import UnsupportedModelError
from edgepack.core.gguf_file import metadata_value

T = gguf.TokenType


def write_tokenizer(reader: gguf.GGUFReader, out_dir: Path) -> int:
    """Save tokenizer files into `out_dir`; returns the vocabulary size."""
    model = metadata_value(reader, "tokenizer.ggml.model")
    tokens: list[str] = list(metadata_value(reader, "tokenizer.ggml.tokens") or [])
    if not tokens:
        raise UnsupportedModelError("the GGUF has no tokenizer.ggml.tokens; cannot rebuild a tokenizer")
    types = [int(t) for t in (metadata_value(reader, "tokenizer.ggml.token_type") or [T.NORMAL] * len(tokens))]
    special = {role: _token(reader, tokens, role) for role in ("bos", "eos", "unk", "pad")}
    add_bos = bool(metadata_value(reader, "tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(metadata_value(reader, "tokenizer.ggml.add_eos_token", False))
    if model == "gpt2":
        fast = _byte_level_bpe(reader, tokens, types, special, add_bos, add_eos)
    elif model == "llama":
        fast = _sentencepiece(reader, tokens, types, out_dir, special, add_bos, add_eos)
    else:
        raise UnsupportedModelError(f"GGUF tokenizer model {model!r} cannot be imported; supported: gpt2, llama")
    template = metadata_value(reader, "tokenizer.chat_template")
    if template:
        fast.chat_template = template
    fast.save_pretrained(out_dir)
    return len(tokens)


def _token(reader: gguf.GGUFReader, tokens: list[str], role: str) -> str | None:
    token_id = metadata_value(reader, f"tokenizer.ggml.{role}_token_id")
    return tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None


def _byte_level_bpe(reader, tokens, types, special, add_bos, add_eos):
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    merges = [tuple(merge.split(" ", 1)) for merge in metadata_value(reader, "tokenizer.ggml.merges") or []]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = build_pretokenizer(str(metadata_value(reader, "tokenizer.ggml.pre", "gpt-2")))
    tokenizer.decoder = decoders.ByteLevel()
    steps = [processors.ByteLevel(trim_offsets=False)]
    bos, eos = special["bos"], special["eos"]
    prefix = [bos] if add_bos and bos else []
    suffix = [eos] if add_eos and eos else []
    if prefix or suffix:
        steps.append(processors.TemplateProcessing(
            single=[*prefix, "$A", *suffix], pair=[*prefix, "$A", "$B:1", *suffix],
            special_tokens=[(token, vocab[token]) for token in dict.fromkeys(prefix + suffix)]))
    tokenizer.post_processor = processors.Sequence(steps)
    added = [AddedToken(tok, special=(kind == T.CONTROL), normalized=False)
             for tok, kind in zip(tokens, types, strict=True) if kind in (T.CONTROL, T.USER_DEFINED)]
    tokenizer.add_tokens(added)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos,
                                   unk_token=special["unk"], pad_token=special["pad"])


def _sentencepiece(reader, tokens, types, out_dir, special, add_bos, add_eos):
    from sentencepiece import sentencepiece_model_pb2
    from transformers import LlamaTokenizerFast

    scores = list(metadata_value(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.trainer_spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
    proto.trainer_spec.vocab_size = len(tokens)
    proto.trainer_spec.byte_fallback = any(kind == T.BYTE for kind in types)
    for role in ("unk", "bos", "eos", "pad"):
        token_id = metadata_value(reader, f"tokenizer.ggml.{role}_token_id")
        setattr(proto.trainer_spec, f"{role}_id", int(token_id) if token_id is not None else -1)
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = bool(metadata_value(reader, "tokenizer.ggml.add_space_prefix", True))
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for token, score, kind in zip(tokens, scores, types, strict=True):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = token, float(score), int(kind)
    model_file = out_dir / "tokenizer.model"
    model_file.write_bytes(proto.SerializeToString())
    # legacy=True: like llama.cpp, text after a special token gets its own leading "▁"
    return LlamaTokenizerFast(vocab_file=str(model_file), from_slow=True, legacy=True,
                              add_prefix_space=proto.normalizer_spec.add_dummy_prefix, add_bos_token=add_bos,
                              add_eos_token=add_eos, bos_token=special["bos"], eos_token=special["eos"],
                              unk_token=special["unk"], pad_token=special["pad"])
