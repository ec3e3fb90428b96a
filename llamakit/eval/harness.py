"""An lm-evaluation-harness model (`--model llamakit`) built on llamakit's own scoring and greedy decoding.

lm_eval finds models in its registry, which only holds classes that were imported, so run it through
this module (it registers the model, then hands the command line to lm_eval's own CLI):

    python -m llamakit.eval.harness --model llamakit \\
        --model_args checkpoint=CKPT,tokenizer=TOK.model[,dtype=fp32,max_length=N,extend_context=true,adapter=DIR] \\
        --tasks hellaswag --batch_size 16 [--include_path my_tasks/] [any other lm_eval option]

or from Python: `import llamakit.eval.harness` and then `lm_eval.simple_evaluate(model="llamakit", ...)`.
lm_eval is optional: nothing else in llamakit imports this module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import lm_eval.models  # noqa: F401  the built-in models first: lm_eval imports them only into an empty registry
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from llamakit.checkpoint import load_checkpoint
from llamakit.eval.perplexity import perplexity_of_ids
from llamakit.eval.scoring import encode_pair, greedy_answers, score_pairs
from llamakit.generate.decode import check_context
from llamakit.runtime import default_device, default_dtype, resolve_device

log = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256


@register_model("llamakit")
class LlamakitLM(LM):
    """A llamakit checkpoint (any format llamakit loads) behind lm_eval's three request types."""

    def __init__(self, checkpoint: str, tokenizer: str | None = None, device: str | None = None,
                 dtype: str | None = None, batch_size: int | str | None = None, max_length: int | str | None = None,
                 adapter: str | None = None, extend_context: bool | str = False, **unused):
        super().__init__()
        if unused:
            log.info("ignoring lm_eval options %s", sorted(unused))
        self._device = _device(device)
        self.model, self.tokenizer = load_checkpoint(checkpoint, tokenizer, dtype or default_dtype(self._device),
                                                     self._device, adapter=adapter)
        self.batch_size = int(batch_size) if str(batch_size or "").isdigit() else DEFAULT_BATCH_SIZE  # "auto": ours
        trained = self.model.config.max_seq_len
        self.max_length = int(max_length) if max_length else trained
        check_context(self.max_length, trained, f"max_length {self.max_length}", "add extend_context=true",
                      str(extend_context).lower() == "true")

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives it) per (context, continuation) request."""
        pairs = [encode_pair(self.tokenizer, context, continuation) for context, continuation in _args(requests)]
        scores = score_pairs(self.model, pairs, self.max_length, self.batch_size, self.tokenizer.pad_id,
                             progress=not disable_tqdm, desc="llamakit loglikelihood")
        return [(s.logprob, s.is_greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text after BOS, in independent windows of max_length tokens."""
        totals = []
        for (text,) in tqdm(_args(requests), desc="llamakit rolling", disable=disable_tqdm):
            nll, _, _ = perplexity_of_ids(self.model, self.tokenizer.encode(text, bos=True), self.max_length,
                                          self.max_length, self.batch_size, self.tokenizer.pad_id)
            totals.append(-nll)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut before the first of each request's `until` strings."""
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        args = _args(requests)
        for i, (_, kwargs) in enumerate(args):
            groups.setdefault(_generation_settings(kwargs), []).append(i)
        outputs: list[str] = [""] * len(args)
        for (until, max_new), members in groups.items():
            answers = greedy_answers(self.model, self.tokenizer, [args[i][0] for i in members], self.max_length,
                                     max_new, until, self.batch_size, progress=not disable_tqdm)
            for i, (text, _) in zip(members, answers):
                outputs[i] = text
        return outputs

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.path)


def _device(name: str | None) -> torch.device:
    """The device asked for; lm_eval asks for cuda by default, so without CUDA that means the CPU."""
    if name and name.startswith("cuda") and not torch.cuda.is_available():
        log.warning("CUDA is not available; evaluating on %s", default_device())
        return default_device()
    return resolve_device(name, "device")


def _args(requests) -> list[tuple]:
    """The argument tuples of lm_eval Instances (or plain tuples, for direct calls)."""
    return [r.args if hasattr(r, "args") else tuple(r) for r in requests]


def _generation_settings(kwargs: dict | None) -> tuple[tuple[str, ...], int]:
    """(stop strings, new-token budget) from lm_eval's gen_kwargs; sampling options are ignored: decoding is greedy."""
    kwargs = dict(kwargs or {})
    until = kwargs.pop("until", None) or []
    until = (until,) if isinstance(until, str) else tuple(until)
    max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
    if kwargs.get("do_sample") or float(kwargs.get("temperature", 0) or 0) > 0:
        log.warning("llamakit's lm_eval model decodes greedily; ignoring sampling options %s", kwargs)
    return until, max_new


def main(argv: Sequence[str] | None = None) -> None:
    """lm_eval's command line, with the llamakit model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
