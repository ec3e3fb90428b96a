"""Verifiable rewards for PPO tests, importable as tests.train.ppo_rewards:<name> (ppo.reward_function)."""


def sentence_ends(prompts, responses):
    """More sentences ended per response, more reward: dense, and within a tiny story model's reach."""
    return [r.count(".") / 4 for r in responses]


def too_few(prompts, responses):
    """A broken reward function: one score short."""
    return [0.0] * (len(responses) - 1)
