"""Semantic near-duplicate removal: documents whose Llama embeddings are too close to an earlier kept one.

Llama 3 removed semantic duplicates; SemDeDup (Abbas et al., 2023) embeds each document, clusters the
embeddings with k-means and drops, within each cluster, documents too similar to a kept one. Here the
embedding is the mean of a Llama model's final hidden states (after its last norm) over the document's
tokens, L2-normalised, so a dot product is the cosine similarity. The search is exact and blocked: each
batch of new documents is compared with every kept embedding, block by block, so a document is dropped
exactly when some earlier kept document is at least `threshold` similar. That costs N_kept x dim floats
of memory (4 KB a document for dim 1024) and O(N x N_kept x dim) multiply-adds: fine for millions of
documents on one machine; past that, cluster first (SemDeDup) and run this within each cluster.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

BLOCK_ROWS = 8192  # kept embeddings per block of the matrix search


class Embedder:
    """Mean-pooled, L2-normalised final hidden states of a llamakit Transformer (load_checkpoint gives one)."""

    def __init__(self, model, tokenizer, max_tokens: int = 512, batch_size: int = 16):
        self.model, self.tokenizer = model, tokenizer
        self.max_tokens = min(max_tokens, model.config.max_seq_len)
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return self.model.config.dim

    @torch.inference_mode()
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors; a text's first max_tokens tokens (BOS first) are embedded."""
        out = [self._embed_batch(texts[i:i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        return np.concatenate(out) if out else np.empty((0, self.dim), dtype=np.float32)

    def _embed_batch(self, texts: Sequence[str]) -> np.ndarray:
        device = self.model.embed_tokens.weight.device
        ids = [self.tokenizer.encode(t, bos=True)[:self.max_tokens] for t in texts]
        lengths = torch.tensor([len(i) for i in ids], device=device)  # (B,)
        tokens = torch.full((len(ids), int(lengths.max())), self.tokenizer.pad_id, dtype=torch.long)
        for row, row_ids in enumerate(ids):
            tokens[row, :len(row_ids)] = torch.tensor(row_ids)  # right padding: causal attention never reaches it
        hidden = final_hidden_states(self.model, tokens.to(device)).float()  # (B, T, dim)
        valid = torch.arange(tokens.shape[1], device=device)[None, :] < lengths[:, None]  # (B, T)
        pooled = (hidden * valid[..., None]).sum(1) / lengths[:, None]  # (B, dim)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()


def final_hidden_states(model, tokens: torch.Tensor) -> torch.Tensor:
    """The model's hidden states after its final norm, (B, T, dim): what the output head would read.

    The last block's output is caught by a forward hook and normed here; the forward itself projects only
    position 0 (logits_at=0), so the vocabulary-sized head costs almost nothing.
    """
    caught = []
    handle = model.layers[-1].register_forward_hook(lambda _module, _args, output: caught.append(output))
    try:
        model(tokens, logits_at=0)
    finally:
        handle.remove()
    return model.norm(caught[0])  # (B, T, dim)


class SemanticDeduplicator:
    """Keeps a document unless its embedding's cosine similarity to an earlier kept one is >= threshold."""

    def __init__(self, threshold: float = 0.95):
        if not -1 <= threshold <= 1:
            raise ValueError(f"a cosine-similarity threshold must be in [-1, 1], got {threshold}")
        self.threshold = threshold
        self._blocks: list[np.ndarray] = []  # kept embeddings, BLOCK_ROWS rows per full block
        self.kept = 0

    def select(self, embeddings: np.ndarray) -> list[bool]:
        """For each row of embeddings (N, dim), in order, whether it is kept (and joins the kept set)."""
        earlier = self._max_similarity(embeddings)  # (N,) to documents kept before this batch
        within = embeddings @ embeddings.T  # (N, N)
        keep: list[bool] = []
        for i in range(len(embeddings)):
            kept_here = [j for j in range(i) if keep[j]]
            best = max(earlier[i], within[i, kept_here].max() if kept_here else -np.inf)
            keep.append(bool(best < self.threshold))
        self._add(embeddings[np.array(keep, dtype=bool)])
        return keep

    def _max_similarity(self, embeddings: np.ndarray) -> np.ndarray:
        """The largest cosine similarity of each row to any kept embedding (-inf when none is kept)."""
        best = np.full(len(embeddings), -np.inf, dtype=np.float32)
        for block in self._blocks:
            np.maximum(best, (embeddings @ block.T).max(axis=1), out=best)  # (N, rows) -> (N,)
        return best

    def _add(self, rows: np.ndarray) -> None:
        self.kept += len(rows)
        while len(rows):
            if not self._blocks or len(self._blocks[-1]) == BLOCK_ROWS:
                self._blocks.append(np.empty((0, rows.shape[1]), dtype=np.float32))
            take = BLOCK_ROWS - len(self._blocks[-1])
            self._blocks[-1] = np.concatenate([self._blocks[-1], rows[:take].astype(np.float32)])
            rows = rows[take:]
