"""A linear quality classifier over hashed word n-grams, and Llama-made labels to train it.

LLaMA 1 kept CommonCrawl pages that "a linear model trained to classify pages used as references in
Wikipedia v.s. randomly sampled pages" scored as references; Llama 3 trained quality classifiers on
labels from Llama 2. Here: features are word 1- and 2-grams hashed (CRC32, stable across processes) into
2^20 buckets, weighted 1 + log(count) and L2-normalised per document; a logistic regression with an L2
penalty is fitted by L-BFGS (torch's) on the full batch, each class weighted to half the loss so an
imbalanced pair of sets does not shift the decision. `label_documents` asks a Llama model a yes/no
question about each document and compares log p(" Yes") with log p(" No") where the answer starts.
The classifier is saved as safetensors or JSON (never pickle): weights, bias and the feature settings.
"""

from __future__ import annotations

import json
import logging
import math
import re
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from llamakit.errors import DataError
from llamakit.files import write_atomic

logger = logging.getLogger(__name__)

FORMAT = "llamakit-quality-classifier"
VERSION = 1
DEFAULT_BUCKETS = 2**20
_WORD = re.compile(r"\w+")
LABEL_PROMPT = ("Here is a document:\n\n{text}\n\nIs this document high-quality educational content: well written, "
                "informative and useful for learning? Answer Yes or No.\nAnswer:")


def features(text: str, buckets: int = DEFAULT_BUCKETS, max_ngram: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(bucket indices, values) of text's hashed word 1..max_ngram-grams: 1 + log(count), L2-normalised."""
    tokens = _WORD.findall(text.lower())
    counts: Counter[int] = Counter()
    for n in range(1, max_ngram + 1):
        for i in range(len(tokens) - n + 1):
            counts[zlib.crc32(" ".join(tokens[i:i + n]).encode("utf-8")) % buckets] += 1
    if not counts:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    index = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    values = 1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64, count=len(counts)))
    return index, (values / np.linalg.norm(values)).astype(np.float32)


@dataclass
class QualityClassifier:
    """p(high quality | text) = sigmoid(weight . features(text) + bias)."""

    weight: np.ndarray  # (buckets,) float32
    bias: float
    max_ngram: int = 2

    @property
    def buckets(self) -> int:
        return self.weight.shape[0]

    def score(self, text: str) -> float:
        """The probability that text belongs to the positive (high-quality) class."""
        index, values = features(text, self.buckets, self.max_ngram)
        logit = float(values @ self.weight[index]) + self.bias
        return 1.0 / (1.0 + math.exp(-logit)) if logit > -700 else 0.0

    def save(self, path: Path) -> None:
        """Write to path: safetensors when it ends in .safetensors, else JSON (only the non-zero weights)."""
        path = Path(path)
        settings = {"format": FORMAT, "version": VERSION, "buckets": self.buckets, "max_ngram": self.max_ngram}
        if path.suffix == ".safetensors":
            from safetensors.numpy import save

            data = save({"weight": self.weight.astype(np.float32), "bias": np.array([self.bias], np.float32)},
                        metadata={k: str(v) for k, v in settings.items()})
        else:
            nonzero = np.flatnonzero(self.weight)
            data = json.dumps({**settings, "bias": self.bias, "weights": {
                str(i): float(self.weight[i]) for i in nonzero}}).encode()
        write_atomic(path, data)

    @classmethod
    def load(cls, path: str | Path) -> QualityClassifier:
        """A classifier written by save(); DataError when path is not one."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"quality classifier {path} does not exist; train one with `llamakit prepare-classifier`")
        try:
            if path.suffix == ".safetensors":
                return cls._from_safetensors(path)
            return cls._from_json(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise DataError(f"{path} is not a quality classifier written by `llamakit prepare-classifier` "
                            f"({err}); train one with that command") from None

    @classmethod
    def _from_safetensors(cls, path: Path) -> QualityClassifier:
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            _check_format(meta)
            return cls(f.get_tensor("weight").astype(np.float32), float(f.get_tensor("bias")[0]),
                       int(meta["max_ngram"]))

    @classmethod
    def _from_json(cls, data: dict) -> QualityClassifier:
        _check_format(data)
        weight = np.zeros(int(data["buckets"]), dtype=np.float32)
        for index, value in data["weights"].items():
            weight[int(index)] = value
        return cls(weight, float(data["bias"]), int(data["max_ngram"]))


def _check_format(meta: dict) -> None:
    if meta.get("format") != FORMAT or int(meta.get("version", -1)) != VERSION:
        raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}, expected {FORMAT!r} "
                         f"version {VERSION}")


def _design_matrix(texts: Sequence[str], buckets: int, max_ngram: int) -> torch.Tensor:
    """The sparse (len(texts), buckets) feature matrix."""
    rows, cols, vals = [], [], []
    for row, text in enumerate(texts):
        index, values = features(text, buckets, max_ngram)
        rows.append(np.full(index.shape, row))
        cols.append(index)
        vals.append(values)
    indices = torch.from_numpy(np.stack([np.concatenate(rows), np.concatenate(cols)]))  # (2, nnz)
    return torch.sparse_coo_tensor(indices, torch.from_numpy(np.concatenate(vals)), (len(texts), buckets),
                                   check_invariants=True).coalesce()


def train_classifier(positive: Sequence[str], negative: Sequence[str], buckets: int = DEFAULT_BUCKETS,
                     max_ngram: int = 2, l2: float = 1e-4, max_iter: int = 200) -> QualityClassifier:
    """Fit the logistic regression: positive texts -> 1, negative -> 0, classes weighted equally."""
    if not positive or not negative:
        raise DataError(f"a classifier needs examples of both classes; got {len(positive)} positive and "
                        f"{len(negative)} negative documents")
    X = _design_matrix([*positive, *negative], buckets, max_ngram)  # (N, buckets), sparse
    y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))])  # (N,)
    sample_weight = torch.cat([torch.full((len(positive),), 0.5 / len(positive)),
                               torch.full((len(negative),), 0.5 / len(negative))])  # (N,) sums to 1
    w = torch.zeros(buckets, 1, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.sparse.mm(X, w).squeeze(1) + b  # (N,)
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * sample_weight).sum()
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    loss = optimizer.step(closure)
    logger.info("quality classifier: training loss %.4f on %d documents", float(loss.detach()), len(y))
    return QualityClassifier(w.detach().squeeze(1).numpy().astype(np.float32), float(b.detach()), max_ngram)


def evaluate_split(docs: Sequence[str], fraction: float = 0.1) -> tuple[list[str], list[str]]:
    """(train, held out): about `fraction` of docs held out by a hash of their text, none if that leaves no training."""
    held = [d for d in docs if zlib.crc32(d.encode("utf-8", "replace")) / 2**32 < fraction]
    train = [d for d in docs if zlib.crc32(d.encode("utf-8", "replace")) / 2**32 >= fraction]
    return (train, held) if train else (list(docs), [])


# --- labels from a Llama model (Llama 3) -------------------------------------------------------------

def _answer_ids(tokenizer, template: str) -> tuple[list[int], int, int]:
    """(tokens the answers share, first " Yes" token after them, first " No" token after them) where the answers
    follow the prompt: one token each ("▁Yes", "▁No") in Llama's vocabularies, "▁" then "Y" / "N" in small ones."""
    context = template.format(text="").rstrip()
    start = len(tokenizer.encode(context, bos=True))
    yes, no = (tokenizer.encode(context + answer, bos=True)[start:] for answer in (" Yes", " No"))
    shared = 0
    while shared < min(len(yes), len(no)) and yes[shared] == no[shared]:
        shared += 1
    if shared == min(len(yes), len(no)):
        raise DataError("the label prompt's \" Yes\" and \" No\" answers encode alike after it; end the prompt where "
                        "an answer follows, e.g. '...Answer:'")
    return yes[:shared], yes[shared], no[shared]


@torch.inference_mode()
def label_documents(model, tokenizer, texts: Sequence[str], template: str = LABEL_PROMPT, batch_size: int = 8,
                    max_doc_chars: int = 4000) -> list[float]:
    """log p(" Yes") - log p(" No") after template.format(text=...) for each text: above 0, the model says yes.

    The two are compared at the first token where the answers differ (after any token they share).

    model is a llamakit Transformer (load it with llamakit.checkpoint.load_checkpoint); texts longer than
    max_doc_chars are cut, and a prompt longer than the model's window loses its oldest tokens.
    """
    if "{text}" not in template:
        raise DataError("the label prompt must contain {text}, where each document goes")
    shared, yes, no = _answer_ids(tokenizer, template)
    window = model.config.max_seq_len
    device = model.embed_tokens.weight.device
    prompts = [(tokenizer.encode(template.format(text=t[:max_doc_chars]).rstrip(), bos=True) + shared)[-window:]
               for t in texts]
    scores: list[float] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="labelling", unit="batch", disable=None):
        batch = prompts[start:start + batch_size]
        lengths = torch.tensor([len(p) for p in batch])
        tokens = torch.full((len(batch), int(lengths.max())), tokenizer.pad_id)
        for row, ids in enumerate(batch):
            tokens[row, :len(ids)] = torch.tensor(ids)  # right padding: a causal model never attends to it
        logits = model(tokens.to(device), logits_at=(lengths - 1).to(device))  # (B, 1, V)
        logprobs = torch.log_softmax(logits[:, 0].float(), dim=-1)  # (B, V)
        scores += (logprobs[:, yes] - logprobs[:, no]).tolist()
    return scores
