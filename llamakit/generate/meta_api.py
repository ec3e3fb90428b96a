"""Meta's Llama 2/3 reference interface (`Llama.build`, `text_completion`, `chat_completion`) on llamakit.

Argument names, defaults and return shapes follow Meta's reference code, so scripts written for it
run unchanged, but any checkpoint format loads and device and dtype are chosen from the machine instead of
assuming CUDA. Under torchrun the model is split over the processes by tensor parallelism, each reading only its
share (a Meta checkpoint with one consolidated.NN.pth per process: just its own file).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from llamakit.checkpoint import load_checkpoint, load_config
from llamakit.errors import LlamakitError
from llamakit.generate.chat import chat_style
from llamakit.generate.compiled import CompiledDecode
from llamakit.generate.decode import Completion, check_context, check_prompts, generate, prepare_for_decoding
from llamakit.generate.sampling import SamplingParams
from llamakit.model import KVCache, Transformer, resolve_dtype
from llamakit.model.quantize import quantization
from llamakit.runtime import default_dtype, device_mesh, init_processes
from llamakit.tokenizer import Tokenizer
from llamakit.tokenizer.chat import UNSAFE_REPLY, Dialog, encode_dialog, has_special_tags, stop_ids_for

log = logging.getLogger(__name__)


class Llama:
    """A model, its tokenizer and a KV cache with max_batch_size slots of max_seq_len tokens."""

    @staticmethod
    def build(ckpt_dir: str | Path, tokenizer_path: str | Path | None, max_seq_len: int, max_batch_size: int,
              model_parallel_size: int | None = None, seed: int = 1, *, device: str | torch.device | None = None,
              dtype: str | torch.dtype | None = None, chat_format: str | None = None,
              adapter_path: str | Path | None = None, extend_context: bool = False, quantize: str | None = None,
              group_size: int | None = None, compile: bool = False) -> Llama:
        """Load any checkpoint (Meta, Hugging Face, llama2.c, llamakit); tokenizer_path None uses the one beside it;
        adapter_path applies a fine-tuned LoRA/prefix/prompt adapter (PEFT format) on top; quantize "int8" or
        "int4" (in groups of group_size) quantizes the linear layers while loading (CPU). max_seq_len beyond the
        model's own is refused unless extend_context (then a warning). compile decodes with a torch.compile'd step
        (generate/compiled.py): each batch size bucket compiles on first use. model_parallel_size: processes the
        model is split over (default: every process of the torchrun job; 1 runs a whole model on each)."""
        if max_seq_len < 2 or max_batch_size < 1:
            raise LlamakitError(f"max_seq_len={max_seq_len} and max_batch_size={max_batch_size} must be at least "
                                "2 and 1")
        # Under torchrun, Meta's build splits the model over all the job's processes (model_parallel_size
        # defaults to the job's size); so does this one, by tensor parallelism (model/tensor_parallel.py).
        procs = init_processes(device)
        mp = model_parallel_size or procs.world_size
        procs = procs.with_layout(tp=mp, names=("model_parallel_size", "pp"))
        mesh = device_mesh(procs)["tp"] if mp > 1 else None
        if mesh is not None and compile:
            raise LlamakitError("compile=True decodes on one process; with model parallelism leave it out")
        device = procs.device
        if mesh is None:  # before the weights load, which can take minutes (a split load reads no config first)
            check_context(max_seq_len, load_config(ckpt_dir).max_seq_len, f"max_seq_len={max_seq_len}",
                          "pass extend_context=True", extend_context)
        transforms = quantization(quantize, group_size, device)
        model, tokenizer = load_checkpoint(ckpt_dir, tokenizer_path, resolve_dtype(dtype) or default_dtype(device),
                                           device, adapter=adapter_path, transforms=transforms, mesh=mesh)
        if mesh is not None:
            check_context(max_seq_len, model.config.max_seq_len, f"max_seq_len={max_seq_len}",
                          "pass extend_context=True", extend_context)
        return Llama(model, tokenizer, max_seq_len, max_batch_size, seed, chat_format, compile)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_seq_len: int, max_batch_size: int,
                 seed: int = 1, chat_format: str | None = None, compile: bool = False):
        self.model, self.tokenizer = prepare_for_decoding(model), tokenizer
        self.compiled = CompiledDecode(self.model) if compile else None
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        self.cache = KVCache.for_model(model, max_batch_size, max_seq_len)  # allocated once, reused by every call
        self.chat_format = chat_style(model, tokenizer, chat_format)
        torch.manual_seed(seed)  # as Meta's build does, for code that samples with the global RNG
        device = model.embed_tokens.weight.device
        self.generator = torch.Generator(device).manual_seed(seed)  # every rank draws the same tokens

    def generate(self, prompt_tokens: list[list[int]], max_gen_len: int, temperature: float = 0.6, top_p: float = 0.9,
                 logprobs: bool = False, echo: bool = False, stop_ids: frozenset[int] | None = None
                 ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Token-level completion: (generated ids per prompt, their logprobs or None), as Meta's generate."""
        completions = self._complete(prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, stop_ids)
        tokens = [(p if echo else []) + c.tokens for p, c in zip(prompt_tokens, completions)]
        if not logprobs:
            return tokens, None
        # With echo, the first token has no context and gets logprob 0 (Meta's convention).
        return tokens, [([0.0] + c.prompt_logprobs if echo else []) + c.logprobs for c in completions]

    def text_completion(self, prompts: list[str], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: int | None = None, logprobs: bool = False, echo: bool = False) -> list[dict]:
        """Continue each prompt; [{"generation": str}] (+ "tokens", "logprobs" when logprobs)."""
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt:
                raise LlamakitError(f"prompt {i} is {prompt!r}; text_completion needs non-empty strings")
        prompt_tokens = [self.tokenizer.encode(p, bos=True) for p in prompts]
        tokens, lps = self.generate(prompt_tokens, self._gen_len(max_gen_len), temperature, top_p, logprobs, echo)
        return [self._result(self.tokenizer.decode(t), t, lp) for t, lp in zip(tokens, lps or [None] * len(tokens))]

    def chat_completion(self, dialogs: list[Dialog], temperature: float = 0.6, top_p: float = 0.9,
                        max_gen_len: int | None = None, logprobs: bool = False) -> list[dict]:
        """Answer each dialog; [{"generation": {"role": "assistant", "content": str}}] (+ tokens/logprobs)."""
        # Llama 2 marks turns with plain-text tags, so dialogs containing them get Meta's refusal.
        refused = [self.chat_format == "llama2" and has_special_tags(d) for d in dialogs]
        run = [d for d, r in zip(dialogs, refused) if not r]
        prompt_tokens = [encode_dialog(self.tokenizer, d, self.chat_format) for d in run]
        tokens, lps = ([], None)
        if run:
            tokens, lps = self.generate(prompt_tokens, self._gen_len(max_gen_len), temperature, top_p, logprobs,
                                        stop_ids=stop_ids_for(self.tokenizer, self.chat_format))
        answers = iter(zip(tokens, lps or [None] * len(tokens)))
        results = []
        for r in refused:
            t, lp = ([], [] if logprobs else None) if r else next(answers)
            text = UNSAFE_REPLY if r else self.tokenizer.decode(t)
            results.append(self._result({"role": "assistant", "content": text}, t, lp))
        return results

    def _complete(self, prompt_tokens: Sequence[Sequence[int]], max_gen_len: int, temperature: float, top_p: float,
                  logprobs: bool, echo: bool, stop_ids: frozenset[int] | None) -> list[Completion]:
        # Each prompt may grow to max_seq_len, but by no more than max_gen_len tokens (Meta's budget).
        budgets = [min(max_gen_len, self.max_seq_len - len(p)) for p in prompt_tokens]
        check_prompts(prompt_tokens, budgets, self.max_batch_size, self.max_seq_len)
        params = SamplingParams(temperature=temperature, top_p=top_p)
        return generate(self.model, self.tokenizer, prompt_tokens, budgets, params, stop_ids=stop_ids,
                        logprobs=logprobs, prompt_logprobs=logprobs and echo, generator=self.generator,
                        cache=self.cache, compiled=self.compiled)

    def _gen_len(self, max_gen_len: int | None) -> int:
        if max_gen_len is None:
            return self.max_seq_len - 1
        if max_gen_len < 1:
            raise LlamakitError(f"max_gen_len={max_gen_len}; ask for at least 1 token")
        return max_gen_len

    def _result(self, generation, tokens: list[int], logprobs: list[float] | None) -> dict:
        if logprobs is None:
            return {"generation": generation}
        return {"generation": generation, "tokens": [self.tokenizer.decode([t]) for t in tokens], "logprobs": logprobs}
