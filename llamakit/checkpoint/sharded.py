"""Load a checkpoint split over the processes of a tensor-parallel mesh: each process reads only its share.

A Meta checkpoint with as many consolidated.NN.pth files as processes is read one file per process, its pieces
used as they are (Meta split the weights the way our tensor-parallel layout does; only wq/wk rows are permuted
to our RoPE layout, per head, which a piece's whole heads allow). Any other checkpoint is read through its
memory-mapped file and each process copies out only the rows or columns it owns (a Meta checkpoint of another
shard count is merged in memory first: every process then briefly holds the whole model).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from llamakit.checkpoint import meta
from llamakit.checkpoint.io import read_json, torch_load
from llamakit.checkpoint.load import _recorded_transforms, detect_format, read_checkpoint
from llamakit.errors import CheckpointError
from llamakit.model.config import ModelConfig, resolve_dtype
from llamakit.model.llama import Transformer
from llamakit.model.tensor_parallel import (
    VOCAB,
    WIDTH,
    apply_tensor_parallel,
    check_tensor_parallel,
    embedding_split,
    repeat_kv_heads,
)


def load_model_tensor_parallel(path: str | Path, mesh: DeviceMesh, dtype: torch.dtype | str | None = None,
                               device: torch.device | str = "cpu") -> Transformer:
    """A Transformer in eval mode whose weights are split over the 1-D mesh `mesh` (DTensors), each process having
    read only its own share of the checkpoint."""
    path, tp, rank = Path(path), mesh.size(), mesh.get_local_rank()
    fmt = detect_format(path)
    if _recorded_transforms(path):
        raise CheckpointError(f"{path}: a quantized or reward checkpoint; tensor parallelism loads plain language "
                              "models (use the checkpoint it was made from)")
    if fmt == "meta" and len(meta.shard_files(path)) == tp:  # one file per process: read only this one's
        config, pieces = _meta_pieces(path, tp, rank, mesh)
        split = _embedding_dim(pieces, config)
    else:  # memory-mapped (a Meta checkpoint of another shard count is merged in memory first)
        (config, full), pieces = read_checkpoint(path), None
        split = embedding_split(config, tp)
    check_tensor_parallel(config, tp)
    with torch.device("meta"):
        model = Transformer(config)
        copies = repeat_kv_heads(model, tp)
    apply_tensor_parallel(model, mesh, embedding_dim=split)
    local = pieces if pieces is not None else _slices(full, model, tp, rank, copies)
    dtype = resolve_dtype(dtype) or local["embed_tokens.weight"].dtype
    state = {}
    for name, param in model.named_parameters():
        piece = local.pop(name, None)
        expected = param.to_local().shape if isinstance(param, DTensor) else param.shape
        if piece is None or piece.shape != expected:
            found = "missing" if piece is None else f"{tuple(piece.shape)}"
            raise CheckpointError(f"{path}: process {rank}'s share of {name} is {found}, expected {tuple(expected)}; "
                                  "the checkpoint does not match its config")
        # A compact copy of its own: a view would keep the whole (memory-mapped) tensor alive.
        piece = piece.to(device=device, dtype=dtype, copy=True, memory_format=torch.contiguous_format)
        if isinstance(param, DTensor):
            piece = DTensor.from_local(piece, mesh, param.placements, run_check=False, shape=param.shape,
                                       stride=param.stride())
        state[name] = piece  # norms stay plain tensors, the same on every process
    model.load_state_dict(state, assign=True)
    model.init_buffers()
    return model.eval().requires_grad_(False)


def _slices(full: dict[str, torch.Tensor], model: nn.Module, tp: int, rank: int, copies: int) -> dict:
    """Each parameter's share for this process, cut from the (memory-mapped) full tensors one at a time."""
    local = {}
    for name, param in model.named_parameters():
        tensor = full.pop(name, None)
        if tensor is None:
            continue
        if copies > 1 and name.endswith(("k_proj.weight", "v_proj.weight")):
            head_dim = model.config.head_dim
            head = rank // copies  # this process's copy of one of the kv_heads heads
            local[name] = tensor[head * head_dim:(head + 1) * head_dim]
        else:
            local[name] = _slice(tensor, param, tp, rank)
    return local


def _slice(tensor: torch.Tensor, param: nn.Parameter, tp: int, rank: int) -> torch.Tensor:
    """The rows or columns of `tensor` this process owns under param's placement (all of it when replicated)."""
    placement = param.placements[0] if isinstance(param, DTensor) else None
    return tensor.chunk(tp, dim=placement.dim)[rank] if isinstance(placement, Shard) else tensor


def _meta_pieces(folder: Path, tp: int, rank: int, mesh: DeviceMesh) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config, and this process's consolidated.NN.pth in our names and RoPE layout (Meta's pieces are our
    shares); no other process's file is opened."""
    shard = torch_load(folder / f"consolidated.{rank:02d}.pth")
    embedding = shard.get("tok_embeddings.weight")
    width = read_json(folder / "params.json").get("dim")
    if embedding is None or embedding.dim() != 2:
        raise CheckpointError(f"{folder}: consolidated.{rank:02d}.pth has no tok_embeddings.weight matrix; this is "
                              "not a Llama checkpoint")
    vocab = embedding.shape[0] * (tp if embedding.shape[1] == width else 1)
    config = meta.config_from_params(folder, vocab_size=vocab)
    local = {}
    for key, tensor in shard.items():
        if key in meta.IGNORED_KEYS:
            continue
        name = meta.meta_to_ours(key)
        if name is None:
            raise CheckpointError(f"{folder}: unknown weight {key!r} in consolidated.{rank:02d}.pth")
        if name.endswith("q_proj.weight"):
            tensor = meta.interleaved_to_halves(tensor, config.n_heads // tp)
        elif name.endswith("k_proj.weight"):
            tensor = meta.interleaved_to_halves(tensor, config.kv_heads // tp)
        local[name] = tensor
    tied = "lm_head.weight" not in local or _tied(local, mesh)
    if tied:  # Meta writes a tied model's matrix twice (Llama 3.2): keep one
        local.pop("lm_head.weight", None)
    return config.replace(tie_word_embeddings=tied), local


def _tied(pieces: dict[str, torch.Tensor], mesh: DeviceMesh) -> bool:
    """Whether the output matrix is the embedding's, as every process's pieces show (split on the vocabulary, both
    pieces are the same rows; a width-split embedding cannot be compared without gathering, so it stays two)."""
    head, embedding = pieces.get("lm_head.weight"), pieces["embed_tokens.weight"]
    same = torch.tensor(int(head is not None and head.shape == embedding.shape and torch.equal(head, embedding)))
    torch.distributed.all_reduce(same, op=torch.distributed.ReduceOp.MIN, group=mesh.get_group())
    return bool(same)


def _embedding_dim(pieces: dict[str, torch.Tensor], config: ModelConfig) -> int:
    """How Meta split the embedding: whole rows (Llama 3) or whole columns (Llama 2)."""
    return VOCAB if pieces["embed_tokens.weight"].shape[1] == config.dim else WIDTH
