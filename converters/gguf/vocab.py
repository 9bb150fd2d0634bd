"""The tokenizer of a Hugging Face model directory as GGUF vocabulary metadata.

Two families: SentencePiece (`tokenizer.model`, GGUF model "llama") and byte-level BPE (`tokenizer.json`
with a ByteLevel pre-tokenizer or decoder, GGUF model "gpt2" plus the pre-tokenizer name llama.cpp expects).
A SentencePiece vocabulary also takes the tokenizer's added tokens (tokenizer.json's `added_tokens` and
tokenizer_config.json's `added_tokens_decoder`, as transformers loads them) with the types llama.cpp expects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
from tokenizers import Tokenizer

from converters.gguf.pretokenizers import identify_pretokenizer
from converters.hf_model import HFModelDir
from edgepack.core.errors import UnsupportedModelError

T = gguf.TokenType
# the score llama.cpp's own converter gives SentencePiece added tokens and padding: pieces no merge should build
UNMERGED_SCORE = -1000.0


@dataclass(frozen=True)
class GGUFVocab:
    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str  # llama.cpp pre-tokenizer name ("default" for SentencePiece)
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    scores: tuple[float, ...] | None
    merges: tuple[str, ...]
    special_ids: dict[str, int]  # bos / eos / unk / pad, those the tokenizer has
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_template: str | None

    @property
    def kind(self) -> str:
        return "spm" if self.model == "llama" else "bpe"


def tokenizer_kind(model_dir: HFModelDir) -> str:
    """"bpe" for byte-level BPE, "spm" for SentencePiece; refuses anything else."""
    tokenizer_json = model_dir.read_json("tokenizer.json")
    if tokenizer_json is not None and _is_byte_level(tokenizer_json):
        return "bpe"
    if (model_dir.path / "tokenizer.model").is_file():
        return "spm"
    kind = (tokenizer_json or {}).get("model", {}).get("type", "unknown")
    raise UnsupportedModelError(
        f"tokenizer not supported: tokenizer.json has a {kind} model without a byte-level pre-tokenizer and there "
        "is no tokenizer.model; supported: byte-level BPE (tokenizer.json) or SentencePiece (tokenizer.model)")


def _is_byte_level(tokenizer_json: dict[str, Any]) -> bool:
    if tokenizer_json.get("model", {}).get("type") != "BPE":
        return False
    blob = json.dumps([tokenizer_json.get("pre_tokenizer"), tokenizer_json.get("decoder")])
    return '"ByteLevel"' in blob


def read_vocab(model_dir: HFModelDir, vocab_size: int) -> GGUFVocab:
    from transformers import AutoTokenizer  # imported late: transformers is slow to import

    hf_tokenizer = AutoTokenizer.from_pretrained(model_dir.path)
    kind = tokenizer_kind(model_dir)
    if kind == "bpe":
        tokens, types, merges, pre = _bpe_tokens(model_dir.path / "tokenizer.json", vocab_size)
        scores = None
        add_space_prefix = None
    else:
        tokens, types, scores, add_space_prefix = _sentencepiece_tokens(model_dir, vocab_size,
                                                                        hf_tokenizer.added_tokens_decoder)
        merges, pre = (), "default"
    add_bos, add_eos = _special_tokens_added(hf_tokenizer)
    return GGUFVocab(
        model="gpt2" if kind == "bpe" else "llama",
        pre=pre,
        tokens=tuple(tokens),
        token_types=tuple(types),
        scores=tuple(scores) if scores is not None else None,
        merges=tuple(merges),
        special_ids=_special_ids(hf_tokenizer, model_dir.config),
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=add_space_prefix,
        chat_template=model_dir.chat_template,
    )


def write_vocab(writer: gguf.GGUFWriter, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(list(vocab.tokens))
    if vocab.scores is not None:
        writer.add_token_scores(list(vocab.scores))
    writer.add_token_types(list(vocab.token_types))
    if vocab.merges:
        writer.add_token_merges(list(vocab.merges))
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
              "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for role, token_id in vocab.special_ids.items():
        adders[role](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def _pad_to(tokens: list[str | None], types: list[int], size: int) -> None:
    """Fill ids the tokenizer does not define (embedding rows past its vocabulary) with unused placeholders."""
    while len(tokens) < size:
        tokens.append(None)
        types.append(T.UNUSED)
    for index, token in enumerate(tokens):
        if token is None:
            tokens[index] = f"[PAD{index}]"
            types[index] = T.UNUSED


def _bpe_tokens(path: Path, vocab_size: int) -> tuple[list[str], list[int], list[str], str]:
    tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    pre = identify_pretokenizer(Tokenizer.from_file(str(path)))
    vocab: dict[str, int] = tokenizer_json["model"]["vocab"]
    added = tokenizer_json.get("added_tokens", [])
    size = max([vocab_size, *(i + 1 for i in vocab.values()), *(t["id"] + 1 for t in added)])
    tokens: list[str | None] = [None] * size
    types: list[int] = [T.NORMAL] * size
    for text, token_id in vocab.items():
        tokens[token_id] = text
    for entry in added:
        tokens[entry["id"]] = entry["content"]
        types[entry["id"]] = T.CONTROL if entry.get("special") else T.USER_DEFINED
    _pad_to(tokens, types, size)
    merges = [" ".join(pair) if isinstance(pair, list) else pair
              for pair in tokenizer_json["model"].get("merges", [])]
    return tokens, types, merges, pre  # type: ignore[return-value]


def _sentencepiece_tokens(model_dir: HFModelDir, vocab_size: int, added_tokens: dict[int, Any]
                          ) -> tuple[list[str], list[int], list[float], bool]:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString((model_dir.path / "tokenizer.model").read_bytes())
    except Exception as exc:  # protobuf's DecodeError
        raise UnsupportedModelError(f"tokenizer.model is not a SentencePiece model: {exc}") from exc
    if proto.trainer_spec.model_type not in (1, 2):  # UNIGRAM, BPE
        raise UnsupportedModelError("tokenizer.model must be a SentencePiece unigram or BPE model")
    tokens: list[str | None] = [piece.piece for piece in proto.pieces]
    types: list[int] = [int(piece.type) for piece in proto.pieces]  # same numbering as GGUF's TokenType
    scores: list[float] = [float(piece.score) for piece in proto.pieces]
    for token_id, added in sorted(added_tokens.items()):
        while len(tokens) <= token_id:
            tokens.append(None)
            types.append(T.UNUSED)
            scores.append(UNMERGED_SCORE)
        tokens[token_id], types[token_id] = _sentencepiece_added_token(added, types[token_id])
        scores[token_id] = UNMERGED_SCORE
    size = max(vocab_size, len(tokens))
    scores.extend([UNMERGED_SCORE] * (size - len(scores)))
    _pad_to(tokens, types, size)
    return tokens, types, scores, _adds_space_prefix(model_dir, proto)  # type: ignore[return-value]


def _sentencepiece_added_token(added: Any, sentencepiece_type: int) -> tuple[str, int]:
    """(text, type) of a Hugging Face added token in a SentencePiece GGUF vocabulary, as llama.cpp reads them.

    llama.cpp matches CONTROL and USER_DEFINED tokens in the raw text before it escapes spaces to "▁" and merges
    the rest, so a user-defined token is written with real spaces: Gemma's whitespace runs ("▁▁▁") would
    otherwise never match, and the merges (which need not build them) decide instead."""
    if added.special:
        # the unknown piece stays UNKNOWN: llama.cpp splits text on it exactly as on a CONTROL token
        return added.content, T.UNKNOWN if sentencepiece_type == T.UNKNOWN else T.CONTROL
    return added.content.replace("\u2581", " "), T.USER_DEFINED


def _adds_space_prefix(model_dir: HFModelDir, proto: Any) -> bool:
    """Whether text gets a leading "▁": tokenizer.json decides when present (it is what transformers runs),
    else the SentencePiece model's add_dummy_prefix."""
    tokenizer_json = model_dir.read_json("tokenizer.json")
    if tokenizer_json is None:
        return bool(proto.normalizer_spec.add_dummy_prefix)
    blob = json.dumps([tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")], ensure_ascii=False)
    prepends = '"type": "Prepend", "prepend": "\u2581"' in blob or '"type": "Prepend", "prepend": "▁"' in blob
    metaspace_prepends = '"prepend_scheme": "first"' in blob or '"prepend_scheme": "always"' in blob
    return prepends or metaspace_prepends


def _special_tokens_added(hf_tokenizer: Any) -> tuple[bool, bool]:
    """Whether the HF tokenizer adds BOS / EOS on plain encoding; llama.cpp must do the same."""
    with_special = hf_tokenizer("a", add_special_tokens=True)["input_ids"]
    without = hf_tokenizer("a", add_special_tokens=False)["input_ids"]
    bos, eos = hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id
    add_bos = bos is not None and len(with_special) > len(without) and with_special[0] == bos
    add_eos = eos is not None and len(with_special) > len(without) and with_special[-1] == eos
    return add_bos, add_eos


def _special_ids(hf_tokenizer: Any, config: dict[str, Any]) -> dict[str, int]:
    ids: dict[str, int] = {}
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(hf_tokenizer, f"{role}_token_id", None)
        if token_id is None:
            token_id = config.get(f"{role}_token_id")
            if isinstance(token_id, list):
                token_id = token_id[0] if token_id else None
        if token_id is not None:
            ids[role] = int(token_id)
    return ids
