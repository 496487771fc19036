"""laser_rl.integrations.openrlhf.rollout on plain tensors: no Ray, no OpenRLHF, no vLLM.

Rollout samples and Experiences are built here with the fields OpenRLHF's own carry (one sample per
rollout item: sequences [1, L], attention_mask [1, L], action_mask [1, L - 1] where action_mask[j]
marks sequences[j + 1], prompts, labels, scores, info); tests/test_openrlhf.py runs the same class
inside OpenRLHF's RemoteExperienceMaker.
"""

from __future__ import annotations

import types

import pytest
import torch

from laser_rl.arms import RuleArm
from laser_rl.context import ContextEncoder
from laser_rl.feedback import pair_loss
from laser_rl.integrations.openrlhf.rollout import LaserRollout, prompt_token_ids, response_token_ids, sequence_logps
from laser_rl.selector import RewardSelector

PROMPTS = ["What is 2 + 3?", "Is Tom an animal?", "Write a happy poem."]
RESPONSES = ["5", "The answer is 8.", "Yes.", "No, that is wrong.", "The sea", "The sun and the sea."]
N = 2


def rms():
    """Three rule RMs that rank samples differently: by length, by minus length, by the digit count."""
    return [
        RuleArm(lambda p, r, l: [float(len(x)) for x in r], name="long"),
        RuleArm(lambda p, r, l: [-float(len(x)) for x in r], name="short"),
        RuleArm(lambda p, r, l: [float(sum(c.isdigit() for c in x)) for x in r], name="digits"),
    ]


def make_samples(tokenizer, verifier=None):
    samples = []
    for i, prompt in enumerate(PROMPTS):
        prompt_ids = tokenizer(prompt)["input_ids"]
        for j in range(N):
            response_ids = tokenizer(RESPONSES[i * N + j])["input_ids"]
            ids = torch.tensor([prompt_ids + response_ids])
            action_mask = torch.zeros(1, ids.shape[1] - 1, dtype=torch.bool)
            action_mask[0, len(prompt_ids) - 1 :] = True
            samples.append(types.SimpleNamespace(
                sequences=ids, attention_mask=torch.ones_like(ids), action_mask=action_mask, prompts=[prompt],
                labels=[str(i)], scores=None if verifier is None else torch.tensor([verifier(i, j)]), info={}, rewards=None,
            ))
    return samples


def make_experiences(samples, micro: int = 4, seed: int = 0):
    """Experiences over micro-batches that cut across prompt groups, as OpenRLHF splits a rollout."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(samples), micro):
        chunk = list(range(start, min(start + micro, len(samples))))
        width = max(samples[i].action_mask.shape[1] for i in chunk)
        mask = torch.zeros(len(chunk), width)
        for row, i in enumerate(chunk):
            m = samples[i].action_mask[0].float()
            mask[row, : len(m)] = m
        logp = -torch.rand(len(chunk), width, generator=g)
        ref = -torch.rand(len(chunk), width, generator=g)
        out.append(types.SimpleNamespace(index=chunk, action_mask=mask, action_log_probs=logp, base_action_log_probs=ref, info={}))
    return out


def test_tokens_come_from_the_rollout_not_a_retokenization(tokenizer):
    samples = make_samples(tokenizer)
    assert prompt_token_ids(samples[2]).tolist() == tokenizer(PROMPTS[1])["input_ids"]
    assert tokenizer.decode(response_token_ids(samples[3])) == RESPONSES[3]


def test_contexts_come_from_the_prompt_states_function(tokenizer):
    seen = []

    def prompt_states(ids):
        seen.append([x.tolist() for x in ids])
        return torch.stack([torch.full((16,), float(len(x))) for x in ids])

    encoder = ContextEncoder(16, proj_dim=4, seed=0)
    selector = RewardSelector(rms(), context_dim=4, bandit="linucb", feedback="spread", seed=0)
    laser = LaserRollout(selector, tokenizer, N, encoder=encoder, prompt_states=prompt_states)
    samples = make_samples(tokenizer)
    contexts = laser.contexts(samples[::N])
    assert seen == [[tokenizer(p)["input_ids"] for p in PROMPTS]]  # one call, each prompt once
    expected = encoder(torch.stack([torch.full((16,), float(len(tokenizer(p)["input_ids"]))) for p in PROMPTS]))
    assert torch.equal(contexts, expected)
    with pytest.raises(ValueError, match="needs both a ContextEncoder and a prompt_states function"):
        LaserRollout(selector, tokenizer, N, encoder=encoder)


def test_pair_loss_feedback_sums_each_samples_log_probs_over_its_response(tokenizer):
    selector = RewardSelector(rms(), baseline="random", feedback="pair_loss", seed=0)
    laser = LaserRollout(selector, tokenizer, N)
    samples = make_samples(tokenizer)
    arms = laser.assign_rewards(samples)
    experiences = make_experiences(samples)
    inputs = sequence_logps(experiences, len(PROMPTS), N)
    for e in experiences:  # by hand: each row's masked sum, at its rollout position
        for row, i in enumerate(e.index):
            m = e.action_mask[row]
            assert inputs["policy_logps"].view(-1)[i] == pytest.approx(float((e.action_log_probs[row] * m).sum()))
            assert inputs["ref_logps"].view(-1)[i] == pytest.approx(float((e.base_action_log_probs[row] * m).sum()))
            assert inputs["response_lengths"].view(-1)[i] == m.sum()
    scores = torch.tensor([float(s.rewards[0]) for s in samples]).view(-1, N)
    laser.feedback(experiences)
    expected = pair_loss(scores, inputs["policy_logps"], inputs["ref_logps"], inputs["response_lengths"], beta=0.1)
    assert selector.metrics()["laser/bandit_reward_raw"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert arms.shape == (len(PROMPTS),)


def test_verifier_feedback_without_scores_fails_and_the_step_survives_for_a_retry(tokenizer):
    selector = RewardSelector(rms(), context_dim=4, bandit="exp3", feedback="verifier", seed=0)
    laser = LaserRollout(selector, tokenizer, N)
    samples = make_samples(tokenizer)  # no verifier scores
    laser.assign_rewards(samples)
    with pytest.raises(ValueError, match="--laser.feedback verifier needs a verifier score per sample"):
        laser.feedback([])
    assert selector.steps == 0 and laser._step is not None  # nothing learned, nothing lost
    laser._step["correct"] = torch.tensor([[True, False]] * len(PROMPTS))
    laser.feedback([])
    assert selector.steps == 1 and laser._step is None


def test_consensus_feedback_audits_inside_select_and_score(tokenizer):
    """Label-free consensus: with audit_fraction 1 every RM scores every sample once more (counted), and the
    bandit learns with no log-probs and no labels: LaserRollout needs nothing from the Experiences."""
    selector = RewardSelector(rms(), context_dim=4, bandit="exp3", feedback="consensus", audit_fraction=1.0, seed=0)
    assert selector.feedback_inputs == ()
    laser = LaserRollout(selector, tokenizer, N, has_reference=False)
    samples = make_samples(tokenizer)
    arms = laser.assign_rewards(samples)
    for sample, arm in zip(samples, arms.repeat_interleave(N)):  # each sample's reward is its own arm's score
        text = tokenizer.decode(response_token_ids(sample), skip_special_tokens=True)
        assert float(sample.rewards[0]) == float(rms()[int(arm)].score([""], [text])[0])
    laser.feedback([])
    metrics = selector.metrics()
    K, total = 3, len(samples)
    assert metrics["laser/rm_passes"] == K * total and metrics["laser/audit_rm_passes"] == (K - 1) * total
    assert selector.steps == 1
