"""Packed fine-tuning rows: each example's loss is what it would be alone (no attention across examples)."""

import torch

from llamakit import load_model
from llamakit.data.sft import Encoded, SFTExamples
from llamakit.model.prefix import PrefixConfig, apply_prompt_tuning
from llamakit.train.objectives import NextTokenLoss, packed_mask
from tests.helpers import hf_llama


def _examples(vocab: int) -> list[Encoded]:
    g = torch.Generator().manual_seed(0)
    examples = []
    for length, prompt in ((9, 4), (13, 6), (7, 2)):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        examples.append(Encoded(ids, [False] * prompt + [True] * (length - prompt)))
    return examples


def _packed_vs_alone(model, examples):
    objective = NextTokenLoss()
    packed = SFTExamples([examples], pad_id=0, packed=True).batch([0])
    alone = [SFTExamples([[e]], pad_id=0).batch([0]) for e in examples]
    with torch.no_grad():
        together, _ = objective.loss(model, packed)
        separate = sum(objective.loss(model, b)[0] for b in alone)
    assert objective.weight(packed) == sum(objective.weight(b) for b in alone) == sum(e.num_targets for e in examples)
    return together, separate


def test_a_packed_row_scores_each_example_as_if_alone(tmp_path):
    hf_llama(num_key_value_heads=2).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    together, separate = _packed_vs_alone(model, _examples(128))
    assert abs(together - separate) <= 1e-4 * abs(separate)


def test_packing_with_a_soft_prompt_gives_every_example_the_prompt(tmp_path):
    hf_llama(num_key_value_heads=2).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    apply_prompt_tuning(model, PrefixConfig(num_virtual_tokens=3))
    together, separate = _packed_vs_alone(model, _examples(128))
    assert abs(together - separate) <= 1e-4 * abs(separate)


def test_the_mask_is_causal_within_segments_only():
    mask = packed_mask(torch.tensor([[0, 0, 1, 1, 1, -1]]))[0, 0]
    assert mask.tolist() == [
        [True, False, False, False, False, False],
        [True, True, False, False, False, False],
        [False, False, True, False, False, False],
        [False, False, True, True, False, False],
        [False, False, True, True, True, False],
        [False, False, False, False, False, True],  # padding sees itself only: no empty (NaN) rows
    ]
