"""Tokenizers inside GGUF files: ours written as llama.cpp's `tokenizer.ggml.*` metadata, and rebuilt from it as a
tokenizer file llamakit reads; the chat formats as the Jinja templates GGUF carries.

llama.cpp calls a SentencePiece vocabulary "llama" (pieces, scores and piece types, numbered as in SentencePiece's
own ModelProto) and a byte-level BPE one "gpt2": each byte spelled as one printable character (GPT-2's
bytes_to_unicode), plus a merge list. A tiktoken rank file has no merge list: its BPE merges whichever adjacent
pair forms the lowest-ranked token, which is what a merge list does when it holds every split of every token into
two tokens, ordered by the rank of the result. So Llama 3's ranks become merges on the way out, and on the way in
the ranks are the token ids once the merges are checked to be in id order.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from pathlib import Path

from sentencepiece import SentencePieceProcessor
from sentencepiece import sentencepiece_model_pb2 as spm_proto

from llamakit import files
from llamakit.errors import CheckpointError
from llamakit.tokenizer import Tokenizer
from llamakit.tokenizer.chat import default_style
from llamakit.tokenizer.tiktoken_bpe import llama3_special_names

log = logging.getLogger(__name__)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # GGUF's token types = SentencePiece's
PAD_PREFIX = "[PAD"  # the filler tokens that pad a vocabulary to the embedding's rows (named as llama.cpp names them)
LLAMA3_PRE = "llama-bpe"  # llama.cpp's name for Llama 3's pre-tokenizer (the split regex)

_ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
           "\\n\\n### Instruction:\\n")
# Each renders exactly what tokenizer/chat.py encodes, for llama.cpp (which parses bos_token/eos_token and the
# Llama 3 header names in the text as special tokens, and starts every text after one with a space, as
# SentencePiece does): a chat model converted by llamakit chats in llama.cpp, Ollama and LM Studio as it does here.
CHAT_TEMPLATES = {
    "llama2": (
        "{%- if messages[0]['role'] == 'system' %}"
        "{%- set system = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}"
        "{%- set messages = messages[1:] %}"
        "{%- else %}{%- set system = '' %}{%- endif %}"
        "{%- for message in messages %}"
        "{%- if message['role'] == 'user' %}"
        "{{- bos_token + '[INST] ' + ((system if loop.first else '') + message['content']) | trim + ' [/INST]' }}"
        "{%- else %}{{- ' ' + message['content'] | trim + ' ' + eos_token }}{%- endif %}"
        "{%- endfor %}"),
    "llama3": (
        "{{- bos_token }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"),
    "alpaca": (
        "{%- for message in messages %}"
        "{%- if message['role'] == 'system' %}{{- raise_exception('the alpaca format has no system message') }}"
        "{%- elif message['role'] == 'user' %}"
        "{{- bos_token + '" + _ALPACA + "' + message['content'] + '\\n\\n### Response:\\n' }}"
        "{%- else %}{{- message['content'] + eos_token }}{%- endif %}"
        "{%- endfor %}"),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's spelling of bytes as printable characters: printable Latin-1 bytes stand for themselves, the other
    68 (controls, space, ...) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelled[b] = chr(b)
        else:
            spelled[b] = chr(256 + extra)
            extra += 1
    return spelled


def vocabulary_fields(tok: Tokenizer, vocab_size: int, chat_format: str | None) -> dict[str, object]:
    """The tokenizer.ggml.* values (and the chat template) for `tok`, its vocabulary padded to `vocab_size`."""
    if tok.kind == "sentencepiece":
        fields = _sentencepiece_fields(tok)
    elif tok.kind == "tiktoken":
        fields = _llama3_fields(tok)
    else:
        raise CheckpointError(f"a {tok.kind} tokenizer cannot be written to GGUF (only SentencePiece and Llama 3's)")
    n = len(fields["tokens"])
    fields["tokens"] += [f"{PAD_PREFIX}{i}]" for i in range(n, vocab_size)]
    fields["token_type"] += [UNUSED] * (vocab_size - n)
    if "scores" in fields:
        fields["scores"] += [-1000.0] * (vocab_size - n)
    fields.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, add_bos_token=True, add_eos_token=False,
                  chat_template=CHAT_TEMPLATES[chat_format or default_style(tok)])
    return fields


def _sentencepiece_fields(tok: Tokenizer) -> dict[str, object]:
    proto = spm_proto.ModelProto.FromString(tok.path.read_bytes())
    if proto.trainer_spec.model_type != spm_proto.TrainerSpec.BPE:
        kind = spm_proto.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise CheckpointError(f"{tok.path}: a SentencePiece {kind} model; GGUF's 'llama' vocabulary is SentencePiece "
                              "BPE (Llama 1/2, tinyllamas), so llama.cpp would tokenize differently")
    if proto.normalizer_spec.remove_extra_whitespaces:
        log.warning("%s squeezes runs of spaces, which GGUF cannot record: llama.cpp (and llamakit reading the GGUF) "
                    "will keep them, so text with repeated spaces tokenizes differently", tok.path)
    fields = {"model": "llama", "pre": "default", "tokens": [p.piece for p in proto.pieces],
              "scores": [p.score for p in proto.pieces], "token_type": [p.type for p in proto.pieces],
              "add_space_prefix": proto.normalizer_spec.add_dummy_prefix}
    unk = [i for i, p in enumerate(proto.pieces) if p.type == UNKNOWN]
    if unk:
        fields["unknown_token_id"] = unk[0]
    if proto.trainer_spec.pad_id >= 0:
        fields["padding_token_id"] = proto.trainer_spec.pad_id
    return fields


def _llama3_fields(tok: Tokenizer) -> dict[str, object]:
    ranks = _read_ranks(tok.path)
    spell = bytes_to_unicode()
    by_rank = sorted(ranks, key=ranks.__getitem__)
    tokens = ["".join(spell[b] for b in token) for token in by_rank]
    specials = sorted(tok.special_tokens.items(), key=lambda item: item[1])
    return {"model": "gpt2", "pre": LLAMA3_PRE, "tokens": tokens + [name for name, _ in specials],
            "token_type": [NORMAL] * len(tokens) + [CONTROL] * len(specials), "merges": _merges(tokens),
            "padding_token_id": tok.pad_id}


def _read_ranks(path: Path) -> dict[bytes, int]:
    """token bytes -> rank from a tiktoken rank file (already validated when the tokenizer loaded it)."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _merges(tokens: list[str]) -> list[str]:
    """Every split of every token into two tokens, "left right", by the rank (index) of the token they form, then
    by the ranks of the two parts (the order Hugging Face's tiktoken conversion gives Llama 3's tokenizer.json)."""
    rank = {token: i for i, token in enumerate(tokens)}
    merges = []
    for token in tokens:
        splits = [(rank[token[:i]], rank[token[i:]]) for i in range(1, len(token))
                  if token[:i] in rank and token[i:] in rank]
        merges += [f"{tokens[left]} {tokens[right]}" for left, right in sorted(splits)]
    return merges


def chat_format_of(template: str | None, vocabulary: str | None) -> str | None:
    """The chat format whose template this is exactly, unless it is the default of the vocabulary's kind (llama3
    for 'gpt2', Llama 3's BPE; llama2 for SentencePiece), which a config records as None, as it does any other
    template: llamakit's chat then follows the tokenizer, as it did when the model was written."""
    name = next((name for name, text in CHAT_TEMPLATES.items() if text == template), None)
    return None if name == ("llama3" if vocabulary == "gpt2" else "llama2") else name


def tokenizer_file(meta: dict[str, object], where: Path) -> Path | None:
    """The GGUF's vocabulary as a tokenizer file llamakit reads (a SentencePiece model, or Llama 3's tiktoken
    ranks), written once into $LLAMAKIT_CACHE/gguf-tokenizers (default ~/.cache/llamakit) under the hash of
    its content; None when the file holds no vocabulary."""
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        return None
    if model == "llama":
        data = _sentencepiece_model(meta, where)
    elif model == "gpt2":
        data = _llama3_ranks(meta, where)
    else:
        raise CheckpointError(f"{where}: its tokenizer is of kind {model!r}, which llamakit cannot rebuild (it reads "
                              "SentencePiece 'llama' and Llama 3 'gpt2' vocabularies); pass --tokenizer")
    root = Path(os.environ.get("LLAMAKIT_CACHE", Path.home() / ".cache" / "llamakit")) / "gguf-tokenizers"
    file = root / f"{hashlib.sha256(data).hexdigest()[:32]}.model"
    if not file.is_file():
        root.mkdir(parents=True, exist_ok=True)
        with files.atomic_file(file) as tmp:
            tmp.write_bytes(data)
    return file


def _vocabulary(meta: dict[str, object], where: Path) -> tuple[list[str], list[int]]:
    """Tokens and types, without the filler tokens that pad the vocabulary to the embedding's rows."""
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if not tokens or len(types) != len(tokens):
        raise CheckpointError(f"{where}: tokenizer.ggml.tokens is missing or does not match token_type; the file's "
                              "vocabulary is damaged; pass --tokenizer")
    while types[-1] == UNUSED and tokens[-1].startswith(PAD_PREFIX):
        tokens.pop(), types.pop()
    return tokens, types


def _sentencepiece_model(meta: dict[str, object], where: Path) -> bytes:
    """A SentencePiece BPE ModelProto with the GGUF's pieces, scores and types, normalized as llama.cpp does: no
    Unicode normalization, no whitespace squeezing, a leading space unless add_space_prefix is false."""
    tokens, types = _vocabulary(meta, where)
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    proto = spm_proto.ModelProto()
    for piece, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=piece, score=score, type=kind)
    spec = proto.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = spm_proto.TrainerSpec.BPE, len(tokens), BYTE in types
    for role in ("unk", "bos", "eos", "pad"):
        key = "unknown" if role == "unk" else "padding" if role == "pad" else role
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if role == "unk" and token_id is None and UNKNOWN in types:
            token_id = types.index(UNKNOWN)
        if token_id is not None and 0 <= token_id < len(tokens):
            setattr(spec, f"{role}_id", token_id)
            setattr(spec, f"{role}_piece", tokens[token_id])
        elif role == "pad":
            spec.pad_id = -1
    norm = proto.normalizer_spec
    norm.name, norm.remove_extra_whitespaces, norm.escape_whitespaces = "identity", False, True
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    data = proto.SerializeToString()
    try:
        SentencePieceProcessor().LoadFromSerializedProto(data)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: its SentencePiece vocabulary does not make a valid model ({e}); pass "
                              "--tokenizer") from None
    return data


def _llama3_ranks(meta: dict[str, object], where: Path) -> bytes:
    """Llama 3's tiktoken rank file from a 'gpt2' vocabulary: the normal tokens by id, then Llama 3's 256 specials."""
    tokens, types = _vocabulary(meta, where)
    pre = meta.get("tokenizer.ggml.pre")
    n_base = types.index(CONTROL) if CONTROL in types else len(types)
    if pre != LLAMA3_PRE or tokens[n_base:] != llama3_special_names() or set(types[:n_base]) != {NORMAL}:
        raise CheckpointError(f"{where}: a BPE vocabulary that is not Llama 3's (pre-tokenizer {pre!r}, {len(tokens)} "
                              "tokens); llamakit's BPE backend reads Llama 3's only (pre-tokenizer 'llama-bpe', 256 "
                              "special tokens after the others); pass --tokenizer")
    _check_merge_order(tokens[:n_base], meta.get("tokenizer.ggml.merges") or [], where)
    spelled = {c: b for b, c in bytes_to_unicode().items()}
    try:
        lines = [base64.b64encode(bytes(spelled[c] for c in token)) + b" %d" % rank
                 for rank, token in enumerate(tokens[:n_base])]
    except KeyError as e:
        raise CheckpointError(f"{where}: token text with the character {e.args[0]!r}, which no byte is spelled as; "
                              "the vocabulary is not byte-level BPE; pass --tokenizer") from None
    return b"\n".join(lines) + b"\n"


def _check_merge_order(tokens: list[str], merges: list[str], where: Path) -> None:
    """The merges form tokens in id order, so the ids are tiktoken's ranks (a merge list with any other priority
    would tokenize differently)."""
    rank, last = {token: i for i, token in enumerate(tokens)}, -1
    for merge in merges:
        left, _, right = merge.partition(" ")
        formed = rank.get(left + right, -1)
        if formed < last or left not in rank or right not in rank:
            raise CheckpointError(f"{where}: merge {merge!r} does not form the tokens in id order, so the ids are not "
                                  "BPE ranks llamakit can use; pass --tokenizer")
        last = formed
