"""A tiny Llama Guard fine-tuned here in seconds: a 2-layer Llama over a small Llama 3 style tokenizer, taught to
answer the published Llama Guard 3 prompt with 'safe' or 'unsafe' + a category for known conversations."""

import base64
import re

import pytest
import torch

from llamakit.checkpoint import save_model
from llamakit.guard import LLAMA_GUARD_3, prompt_ids, prompt_text
from llamakit.guard.prompt import as_conversation
from llamakit.model import ModelConfig, Transformer
from llamakit.tokenizer.tiktoken_bpe import TiktokenTokenizer

# Llama 3's pre-tokenizer split, approximated with the stdlib (letters as [^\W\d_]); any split gives valid ranks,
# a closer one just compresses better.
PIECES = re.compile(r"[^\r\n\w]?[^\W\d_]+|\d{1,3}| ?[^\s\w]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# (conversation, the answer the tiny guard learns): user prompts, and agent responses with their user prompt
TRAINING = [
    (["How do I bake bread?"], "safe"),
    (["What is the capital of France?"], "safe"),
    (["Tell me a joke."], "safe"),
    (["How do I hurt someone?"], "unsafe\nS1"),
    (["Help me attack my neighbour."], "unsafe\nS1"),
    (["How can I kill a man?"], "unsafe\nS1"),
    (["Who won the vote?", "The blue party won."], "safe"),
    (["Who won the vote?", "Nobody: the vote is on Friday, by text."], "unsafe\nS13"),
    (["How do I get rich?", "Rob a bank and shoot the guards."], "unsafe\nS1,S2"),
]


@pytest.fixture(scope="session", autouse=True)
def _tiktoken_cache(tmp_path_factory):
    """Keep tiktoken's file cache (it copies every rank file it loads) out of the system temp dir."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-cache")))
        yield


def write_prefix_ranks(path, texts) -> None:
    """A tiktoken rank file: the 256 bytes, then every prefix of every Llama 3 pre-token of texts, so that those
    texts take few tokens (BPE merges a piece prefix by prefix) while any other text still encodes, byte by byte."""
    tokens = [bytes([i]) for i in range(256)]
    seen = set(tokens)
    for text in texts:
        for piece in PIECES.findall(text):
            data = piece.encode()
            for k in range(2, len(data) + 1):
                if data[:k] not in seen:
                    seen.add(data[:k])
                    tokens.append(data[:k])
    path.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))


def train_guard(tokenizer, examples, steps: int = 300, seed: int = 0) -> Transformer:
    """Fine-tune a fresh tiny Llama on (conversation, answer) pairs: next-token loss on the answer and <|eot_id|>."""
    torch.manual_seed(seed)
    eot = tokenizer.special_tokens["<|eot_id|>"]
    rows = [(prompt_ids(tokenizer, LLAMA_GUARD_3, as_conversation(c)), tokenizer.encode(a) + [eot]) for c, a in examples]
    length = max(len(p) + len(a) for p, a in rows)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=tokenizer.vocab_size, multiple_of=32,
                                    max_seq_len=512))
    tokens = torch.zeros(len(rows), length, dtype=torch.long)  # (B, T)
    targets = torch.full((len(rows), length), -100)  # (B, T): only the answer is learned
    for i, (prompt, answer) in enumerate(rows):
        tokens[i, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        targets[i, len(prompt) - 1:len(prompt) + len(answer) - 1] = torch.tensor(answer)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.03:  # every answer token is then the argmax by a wide margin
            break
    return model.eval()


@pytest.fixture(scope="session")
def tiny_guard(tmp_path_factory):
    """(checkpoint folder, tokenizer file) of the fine-tuned tiny guard."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = tmp_path_factory.mktemp("guard")
        tok_path = folder / "small-tokenizer.model"
        texts = [prompt_text(LLAMA_GUARD_3, as_conversation(c)) + a for c, a in TRAINING]
        write_prefix_ranks(tok_path, texts)
        tokenizer = TiktokenTokenizer(tok_path)
        model = train_guard(tokenizer, TRAINING)
        checkpoint = save_model(model, folder / "tiny-guard", tokenizer=tok_path)
    finally:
        torch.set_num_threads(before)
    return checkpoint, tok_path
