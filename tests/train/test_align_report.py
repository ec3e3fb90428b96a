"""align_report on the real stories260K: the split is disjoint by prompt, the KL to the SFT model is the per-answer
sum computed one answer at a time (0 for the model itself), the accuracies are a direct count, and the report runs."""

import json

import pytest
import torch

from llamakit import load_model, save_model
from llamakit.checkpoint.peft import save_adapter
from llamakit.data.preference import PreferencePair, Prompt, read_pairs
from llamakit.model.lora import LoRAConfig, apply_lora
from llamakit.model.reward import apply_reward_head, scores
from llamakit.tokenizer.chat import encode_exchanges
from llamakit.train import align_report
from llamakit.train.align_report import load_policy, pairwise_accuracy, sample_answers, sequence_kl, split_pairs
from llamakit.train.rewards import RewardModel

PAIRS = [{"prompt": "Tell me a story about a cat.", "chosen": "Once upon a time, a cat sat.", "rejected": "No."},
         {"prompt": "What is the sun?", "chosen": "A star.", "rejected": "I will not say."},
         {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                       {"role": "user", "content": "Tell me a joke."}], "chosen": "A fish.", "rejected": "Go away."}]


@pytest.fixture(scope="module")
def files(assets, tmp_path_factory, one_thread):
    """An SFT model folder, a LoRA adapter on it (random B: it changes the model), a reward model, held-out pairs."""
    folder = tmp_path_factory.mktemp("align")
    tok = assets / "tinyllamas" / "tok512.model"
    model = load_model(assets / "tinyllamas" / "stories260K.bin")
    save_model(model, folder / "sft", tokenizer=tok)
    torch.manual_seed(0)
    lora = LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"))
    apply_lora(model, lora)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    save_adapter(folder / "adapter", model, lora)
    save_model(apply_reward_head(load_model(assets / "tinyllamas" / "stories260K.bin")), folder / "rm", tokenizer=tok)
    pairs = folder / "heldout.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    return folder


def _answers(files, path, batch_size=3):
    policy, tokenizer = load_policy(str(files / "sft"), str(path))
    prompts = [Prompt(p.prompt) for p in read_pairs(files / "heldout.jsonl")[0]]
    return policy, tokenizer, sample_answers(policy, tokenizer, prompts, 12, 1.0, 0, batch_size)


def test_the_split_is_disjoint_by_prompt_and_keeps_every_pair():
    pairs = [PreferencePair([{"role": "user", "content": f"question {i % 50}"}], f"yes {i}", f"no {i}")
             for i in range(200)]  # each question asked 4 times
    parts = split_pairs(pairs)
    assert sum(map(len, parts.values())) == len(pairs) and split_pairs(pairs) == parts
    owners = {}
    for name, part in parts.items():
        for pair in part:
            assert owners.setdefault(pair.prompt[0]["content"], name) == name  # a prompt lives in one part only
    assert all(parts.values())


def test_write_splits_skips_malformed_dialogs_and_writes_sft_rows(tmp_path):
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}],
           "chosen": "e", "rejected": "f"}
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in [*PAIRS, bad] * 20))
    counts = align_report.write_splits(str(source), tmp_path / "out")
    assert counts["skipped"] == 20 and counts["rm_train"] == counts["sft"]
    sft = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    train = read_pairs(tmp_path / "out" / "rm_train.jsonl")[0]
    assert [row["messages"] for row in sft] == [[*p.prompt, {"role": "assistant", "content": p.chosen}] for p in train]


def test_the_kl_of_a_model_to_itself_is_zero(files):
    policy, tokenizer, answers = _answers(files, files / "sft")
    again = load_policy(str(files / "sft"), str(files / "sft"))[0]  # another copy: no shortcut on identity
    kl = sequence_kl(policy, again, answers["prompts"], answers["responses"], tokenizer.eos_id)
    assert kl.tolist() == [0.0, 0.0, 0.0]


def test_the_kl_is_each_answers_log_ratio_summed_alone(files):
    policy, tokenizer, answers = _answers(files, files / "adapter")
    sft = load_policy(str(files / "sft"), str(files / "sft"))[0]
    kl = sequence_kl(policy, sft, answers["prompts"], answers["responses"], tokenizer.eos_id, batch_size=2)
    for i, (prompt, response) in enumerate(zip(answers["prompts"], answers["responses"])):
        ids = torch.tensor([prompt + response])
        span = slice(len(prompt) - 1, ids.size(1) - 1)  # the positions that predict the response
        target = ids[0, len(prompt):]
        lp, ref = (m(ids)[0, span].log_softmax(-1).gather(-1, target[:, None]).sum() for m in (policy, sft))
        assert kl[i].item() == pytest.approx((lp - ref).item(), abs=1e-4)
    assert kl.abs().sum() > 0  # the adapter moved the model


def test_the_same_seeds_give_the_same_answers_whatever_the_batch(files):
    _, _, one = _answers(files, files / "sft", batch_size=1)
    _, _, all_ = _answers(files, files / "sft", batch_size=3)
    assert one["responses"] == all_["responses"] and len(set(map(tuple, one["responses"]))) == 3


def test_the_accuracy_is_a_direct_count(files):
    rm = RewardModel.load(files / "rm")
    model, tokenizer = rm.model, rm.tokenizer
    pairs = read_pairs(files / "heldout.jsonl")[0]

    def alone(prompt, answer):
        exchanges = encode_exchanges(tokenizer, [*prompt, {"role": "assistant", "content": answer}], "llama2")
        ids = torch.tensor([[i for p, a in exchanges for i in p + a]])
        return scores(model, ids, torch.tensor([ids.size(1) - 1])).item()

    wins = sum(alone(p.prompt, p.chosen) > alone(p.prompt, p.rejected) for p in pairs)
    assert pairwise_accuracy(rm, pairs) == pytest.approx(wins / len(pairs))


def test_the_paired_difference_and_its_standard_error():
    mean, se = align_report.paired_difference(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 1.0]))
    assert mean == pytest.approx(5 / 3) and se == pytest.approx(1 / 3)  # d = 1, 2, 2: sd sqrt(1/3), over sqrt(3)


def test_the_report_end_to_end(files, capsys):
    out = files / "report.json"
    align_report.main(["report", "--sft", str(files / "sft"), "--policy", f"LoRA={files / 'adapter'}",
                       "--prompts", str(files / "heldout.jsonl"), "--judge", str(files / "rm"), "--train-rm",
                       str(files / "rm"), "--max-new-tokens", "8", "--output", str(out)])
    found = json.loads(out.read_text())
    assert list(found["policies"]) == ["SFT", "LoRA"] and found["pairs"] == found["prompts"] == 3
    assert found["policies"]["SFT"]["judge_vs_sft"] == [0.0, 0.0]
    assert found["policies"]["SFT"]["kl_to_sft"] == 0.0 and found["policies"]["LoRA"]["kl_to_sft"] != 0.0
    sft = found["policies"]["SFT"]
    assert sft["judge_reward"] == sft["train_rm_reward"]  # one reward model in both roles
    assert 0 < sft["length"] <= 8 and found["accuracy"]["judge"] == found["accuracy"]["train_rm"]
    printed = capsys.readouterr().out
    assert "| SFT |" in printed and "| LoRA |" in printed and "held-out pairwise accuracy (3 pairs)" in printed
