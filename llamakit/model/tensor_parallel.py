"""Tensor parallelism applied to an existing Transformer from outside, with DTensor (torch.distributed.tensor).

The layout Megatron-LM introduced and torchtitan uses for Llama, over the processes of a 1-D "tp" mesh:
- q/k/v and gate/up are column-parallel (each process computes its share of the heads and of the MLP width),
  o and down are row-parallel (each multiplies its share, then one all-reduce, or a reduce-scatter with
  sequence parallelism), so a block costs two collectives forward;
- the embedding is split on the vocabulary (Llama 3's VocabParallelEmbedding) or on its width (Llama 2's
  ParallelEmbedding), the output head on the vocabulary;
- for training, sequence parallelism shards the norms' activations along the sequence, and the head's logits
  stay sharded on the vocabulary for a vocabulary-parallel cross-entropy (`loss_parallel`), so no process ever
  holds the full (B, T, vocab) logits.
The attention module's head counts become this process's share; the model's forward takes them from its
projections' outputs. With more processes than key/value heads (e.g. MQA on 2), the key/value heads are repeated
first (as Meta's reshard_mp does), so each process owns one copy.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from llamakit.errors import ConfigError
from llamakit.model.config import ModelConfig
from llamakit.model.llama import TiedHead

VOCAB, WIDTH = 0, 1  # the embedding's split dimension: Shard(0) splits the vocabulary, Shard(1) the width


def check_tensor_parallel(config: ModelConfig, tp: int, training: bool = False) -> None:
    """Refuse a degree the model's shapes do not allow, naming the sizes and the degrees that work."""
    sizes = {"n_heads": config.n_heads, "ffn hidden_dim": config.ffn_hidden_dim}
    if training or tp <= config.kv_heads:  # inference repeats key/value heads when tp exceeds their number
        sizes["n_kv_heads"] = config.kv_heads
    elif tp % config.kv_heads:
        sizes["n_kv_heads (repeated to tp copies)"] = config.kv_heads
    bad = [f"{name}={value}" for name, value in sizes.items() if value % tp]
    if config.vocab_size % tp and config.dim % tp:
        bad.append(f"vocab_size={config.vocab_size} or dim={config.dim} (the embedding splits along one)")
    if bad:
        good = [n for n in range(1, config.n_heads + 1) if config.n_heads % n == 0 and config.ffn_hidden_dim % n == 0
                and (config.kv_heads % n == 0 or (not training and n % config.kv_heads == 0))]
        raise ConfigError(f"tensor parallelism over {tp} processes needs {tp} to divide {', '.join(bad)}; degrees "
                          f"this model allows: {', '.join(map(str, good))}")


def embedding_split(config: ModelConfig, tp: int) -> int:
    """The vocabulary when it divides (Llama 3's choice), else the width."""
    return VOCAB if config.vocab_size % tp == 0 else WIDTH


def repeat_kv_heads(model: nn.Module, tp: int) -> int:
    """Give every attention layer tp key/value heads when it has fewer (on the meta device, before loading: the
    loader fills each copy with its head's weights); returns how many times each head is repeated."""
    kv = model.config.kv_heads
    if tp <= kv:
        return 1
    for block in model.layers:
        attn = block.self_attn
        for name in ("k_proj", "v_proj"):
            old = getattr(attn, name)
            setattr(attn, name, nn.Linear(old.in_features, tp * attn.head_dim, bias=False,
                                          device=old.weight.device, dtype=old.weight.dtype))
        attn.n_kv_heads = tp
    return tp // kv


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh, *, embedding_dim: int = VOCAB,
                          sequence_parallel: bool = False, loss_parallel: bool = False) -> nn.Module:
    """Shard `model`'s weights over the 1-D mesh in place (parameters become DTensors; on the meta device too, to
    load each process's share afterwards). Modules a pipeline stage lacks (embedding, norm, head) are skipped.

    sequence_parallel: activations between blocks are sharded on the sequence (T must divide by the degree) and
    the norms run on each process's slice; loss_parallel: the logits stay sharded on the vocabulary (a DTensor,
    for `torch.distributed.tensor.parallel.loss_parallel`), else every process gets them whole.
    """
    tp = mesh.size()
    between = Shard(1) if sequence_parallel else Replicate()  # the residual stream's layout between modules
    plan = {}
    if getattr(model, "embed_tokens", None) is not None:
        style = RowwiseParallel if embedding_dim == VOCAB else ColwiseParallel
        plan["embed_tokens"] = style(input_layouts=Replicate(), output_layouts=between)
    if getattr(model, "norm", None) is not None and sequence_parallel:
        plan["norm"] = SequenceParallel()
    if getattr(model, "lm_head", None) is not None:
        logits = Shard(-1) if loss_parallel else Replicate()
        if isinstance(model.lm_head, TiedHead):  # the embedding's matrix, which the embedding's plan splits
            if embedding_dim == WIDTH and loss_parallel:
                raise ConfigError("a vocabulary-parallel loss needs a tied embedding split on the vocabulary")
            made = Shard(-1) if embedding_dim == VOCAB else Partial()  # a width split sums partial logits
            plan["lm_head"] = _tied_head_style(between, made, logits, loss_parallel)
        else:
            plan["lm_head"] = ColwiseParallel(input_layouts=between, output_layouts=logits,
                                              use_local_output=not loss_parallel)
    parallelize_module(model, mesh, plan)
    for block in blocks(model):
        parallelize_module(block, mesh, _block_plan(between, sequence_parallel))
        attn = block.self_attn
        attn.n_heads, attn.n_kv_heads = attn.n_heads // tp, attn.n_kv_heads // tp  # this process's share
    return model


def _block_plan(between, sequence_parallel: bool) -> dict:
    """One Transformer block: column-parallel in, row-parallel out, in attention and in the MLP."""
    plan = {
        "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(output_layouts=between),
        "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=between),
    }
    if sequence_parallel:  # norms on sequence slices; attention and the MLP gather the whole sequence first
        plan.update({
            "input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None, None)),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        })
    return plan


def _tied_head_style(between, made, logits, loss_parallel: bool):
    """A tied head multiplies by the embedding's (already split) matrix: hand it a DTensor input, take the logits
    it makes (`made`: split on the vocabulary, or partial sums), and lay them out as asked."""
    class TiedHeadParallel(PrepareModuleInput):
        def __init__(self):
            super().__init__(input_layouts=(between,), desired_input_layouts=(Replicate(),), use_local_output=False)
            self.output = PrepareModuleOutput(output_layouts=(made,), desired_output_layouts=(logits,),
                                              use_local_output=not loss_parallel)

        def _apply(self, module, device_mesh):
            super()._apply(module, device_mesh)
            return self.output._apply(module, device_mesh)

    return TiedHeadParallel()


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a model (a ModuleList) or of a pipeline stage (a ModuleDict keyed by layer index)."""
    layers = model.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights this process holds: its shares of the split matrices, and the replicated ones whole."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).untyped_storage().nbytes() for p in model.parameters())
