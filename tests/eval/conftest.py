"""Fixtures: the real stories260K model and tokenizer, the same weights in transformers, and data files."""

import pytest
import torch

from llamakit import load_checkpoint, save_model


@pytest.fixture(scope="session")
def stories(assets):
    """(model, tokenizer) of the real tinyllamas stories260K (512-token window, 512-token vocabulary)."""
    tiny = assets / "tinyllamas"
    return load_checkpoint(tiny / "stories260K.bin", tiny / "tok512.model")


@pytest.fixture(scope="session")
def stories_hf(stories, tmp_path_factory):
    """stories260K converted to a Hugging Face folder, loaded by transformers (the independent reference)."""
    from transformers import LlamaForCausalLM

    model, tokenizer = stories
    folder = tmp_path_factory.mktemp("stories260k") / "hf"
    save_model(model, folder, "hf", tokenizer=tokenizer.path)
    return LlamaForCausalLM.from_pretrained(folder).eval(), folder


def hf_score(hf_model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """transformers' log-probability of continuation after context (same ids as ours), and whether it is greedy."""
    tokens = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(tokens).logits[0, :-1].float(), dim=-1)  # (T - 1, V)
    rows = logprobs[len(context) - 1:]  # the positions that predict the continuation
    target = torch.tensor(continuation)
    return rows.gather(-1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())
