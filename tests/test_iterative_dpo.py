import copy
import hashlib
import json
import math

import pytest
import torch

from laser_rl import ENSEMBLE, RewardSelector
from laser_rl.arms import NoisyArm, RuleArm, SequenceClassifierArm
from laser_rl.cli import main
from laser_rl.context import ContextEncoder
from laser_rl.iterative_dpo import (
    IterativeDPOConfig,
    build_preference_pairs,
    dpo_nll_loss,
    iterative_dpo_step,
    run_iterative_dpo,
)
from laser_rl.lm import Rollout

RECORDS = [
    {"prompt": "What is 2 + 3?", "answer": "5", "domain": "math"},
    {"prompt": "All cats are animals. Is Tom an animal?", "answer": "yes", "domain": "logic"},
    {"prompt": "Write a short happy poem.", "answer": "sea", "domain": "chat"},
]


def _setup(tokenizer, causal_lm, reward_model, **selector_kwargs):
    # Training changes weights in place: never train the session fixtures themselves.
    policy, reference = copy.deepcopy(causal_lm), copy.deepcopy(causal_lm)
    arms = [SequenceClassifierArm(reward_model, tokenizer, name="rm"), NoisyArm(sigma=1.0, seed=3)]
    encoder = ContextEncoder(causal_lm.config.hidden_size)
    selector = RewardSelector(arms, context_dim=encoder.dim, **{"feedback": "pair_loss", **selector_kwargs})  # the step's signal
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    return policy, reference, selector, encoder, optimizer


def _config(**kw):
    return IterativeDPOConfig(**{"batch_size": 3, "n_samples": 4, "max_new_tokens": 6, "lr": 1e-3, **kw})


# ----- preference pairs --------------------------------------------------------------------------
def _samples(tokenizer, P=3, n=4, responses=None):
    prompts = [f"prompt {p}" for p in range(P)]
    responses = responses or [[f"p{p} answer {j}" for j in range(n)] for p in range(P)]
    return Rollout.from_texts(tokenizer, prompts, responses)


def test_pairs_are_best_vs_lower_ranked_within_each_prompt(tokenizer):
    samples = _samples(tokenizer)
    scores = torch.tensor([[0.1, 0.9, 0.5, -1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 3.0, 3.0, 1.0]])
    pairs = build_preference_pairs(scores, samples)
    assert [(pr.chosen, pr.rejected) for pr in pairs[0]] == [(1, 3), (1, 0), (1, 2)]  # worst first
    assert pairs[1] == []  # all tie: the RM expressed no preference
    assert [(pr.chosen, pr.rejected) for pr in pairs[2]] == [(1, 0), (1, 3)]  # tie at the top: lowest index wins
    for p, group in enumerate(pairs):
        for pr in group:
            assert pr.prompt_index == p and pr.prompt == samples.prompts[p]
            assert pr.chosen_text in samples.grouped()[p] and pr.rejected_text in samples.grouped()[p]
            assert pr.chosen_score > pr.rejected_score
    limited = build_preference_pairs(scores, samples, max_pairs_per_prompt=1)
    assert [(pr.chosen, pr.rejected) for pr in limited[0]] == [(1, 3)]


def test_identical_responses_and_nan_scores_make_no_pair(tokenizer):
    samples = _samples(tokenizer, P=1, n=3, responses=[["p0 answer 0", "p0 answer 1", "p0 answer 0"]])  # 2 = the best's tokens
    pairs = build_preference_pairs(torch.tensor([[1.0, 0.0, -1.0]]), samples)
    assert [(pr.chosen, pr.rejected) for pr in pairs[0]] == [(0, 1)]
    assert build_preference_pairs(torch.tensor([[math.nan, 1.0, math.nan]]))[0] == []
    with pytest.raises(ValueError, match="n >= 2"):
        build_preference_pairs(torch.zeros(2, 1))


def test_pairs_never_mix_prompts_in_a_training_step(tokenizer, causal_lm, reward_model):
    policy, reference, selector, encoder, optimizer = _setup(tokenizer, causal_lm, reward_model)
    result = iterative_dpo_step(policy, reference, tokenizer, selector, encoder, optimizer, RECORDS, _config())
    assert sum(len(g) for g in result.pairs) > 0
    for p, group in enumerate(result.pairs):
        for pr in group:
            assert pr.prompt_index == p and pr.prompt == result.rollout.prompts[p]
            assert result.rollout.grouped()[p][pr.chosen] == pr.chosen_text
            assert result.rollout.grouped()[p][pr.rejected] == pr.rejected_text
            assert result.scores[p, pr.chosen] == result.scores[p].max()


# ----- the loss ------------------------------------------------------------------------------------
def test_dpo_nll_loss_equals_hand_computed_value():
    pc = torch.tensor([-3.0, -3.0, -5.0])
    pr = torch.tensor([-4.0, -6.0, -4.5])
    rc = torch.tensor([-3.5, -3.5, -5.2])
    rr = torch.tensor([-3.8, -5.0, -4.0])
    lengths = torch.tensor([3.0, 3.0, 4.0])
    loss, per_prompt, per_dpo = dpo_nll_loss(pc, pr, rc, rr, lengths, torch.tensor([0, 0, 2]), num_prompts=3, beta=0.1, nll_weight=1.0)

    def neg_log_sigmoid(x):
        return math.log1p(math.exp(-x))

    # prompt 0: margins (-3+4)-(-3.5+3.8) = 0.7 and (-3+6)-(-3.5+5) = 1.5; NLL = 3/3
    dpo0 = (neg_log_sigmoid(0.1 * 0.7) + neg_log_sigmoid(0.1 * 1.5)) / 2
    # prompt 2: margin (-5+4.5)-(-5.2+4) = 0.7; NLL = 5/4
    dpo2 = neg_log_sigmoid(0.1 * 0.7)
    assert per_dpo[0].item() == pytest.approx(dpo0, abs=1e-6)
    assert per_prompt[0].item() == pytest.approx(dpo0 + 1.0, abs=1e-6)
    assert per_prompt[2].item() == pytest.approx(dpo2 + 1.25, abs=1e-6)
    assert math.isnan(per_prompt[1].item())  # no pairs for prompt 1
    assert loss.item() == pytest.approx((dpo0 + 1.0 + dpo2 + 1.25) / 2, abs=1e-6)
    dpo_only, _, _ = dpo_nll_loss(pc, pr, rc, rr, lengths, torch.tensor([0, 0, 2]), 3, beta=0.1, nll_weight=0.0)
    assert dpo_only.item() == pytest.approx((dpo0 + dpo2) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="num_pairs"):
        dpo_nll_loss(pc, pr[:2], rc, rr, lengths, torch.tensor([0, 0, 2]), 3)


def test_dpo_nll_loss_equals_openrlhf_dpo_loss_per_prompt_plus_nll():
    """OpenRLHF's DPOLoss is the reference: per prompt, its mean over the prompt's pairs plus the mean NLL."""
    import laser_rl.integrations.openrlhf.compat as compat

    try:
        compat.ensure_openrlhf_importable()
        from openrlhf.models.loss import DPOLoss
    except ImportError as e:
        pytest.skip(f"OpenRLHF (the reference) is not importable: {e}")
    g = torch.Generator().manual_seed(0)
    M, P = 11, 4
    pc, pr, rc, rr = (-20 * torch.rand(M, generator=g) for _ in range(4))
    pc.requires_grad_(True)
    lengths = torch.randint(1, 9, (M,), generator=g).float()
    index = torch.tensor([0, 0, 0, 1, 3, 3, 3, 3, 1, 0, 3])  # prompt 2 has no pair
    for beta, nll_weight in ((0.1, 1.0), (0.5, 0.0), (2.0, 0.3)):
        loss, per_prompt, per_dpo = dpo_nll_loss(pc, pr, rc, rr, lengths, index, P, beta=beta, nll_weight=nll_weight)
        reference = DPOLoss(beta)
        expected = []
        for p in (0, 1, 3):
            rows = index == p
            dpo, _, _ = reference(pc[rows], pr[rows], rc[rows], rr[rows])
            torch.testing.assert_close(per_dpo[p], dpo, atol=1e-6, rtol=1e-6)
            expected.append(dpo + nll_weight * (-pc[rows] / lengths[rows]).mean())
            torch.testing.assert_close(per_prompt[p], expected[-1], atol=1e-6, rtol=1e-6)
        assert math.isnan(per_prompt[2].item()) and math.isnan(per_dpo[2].item())
        torch.testing.assert_close(loss, torch.stack(expected).mean(), atol=1e-6, rtol=1e-6)
        # The same gradient as the reference: the policy trains on this loss.
        (grad,) = torch.autograd.grad(loss, pc)
        (expected_grad,) = torch.autograd.grad(torch.stack(expected).mean(), pc)
        torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)


# ----- training and bandit feedback ---------------------------------------------------------------
def test_step_trains_against_a_frozen_reference_and_feeds_minus_loss(tokenizer, causal_lm, reward_model):
    policy, reference, selector, encoder, optimizer = _setup(tokenizer, causal_lm, reward_model)
    frozen = {k: v.clone() for k, v in reference.state_dict().items()}
    config = _config()
    first = iterative_dpo_step(policy, reference, tokenizer, selector, encoder, optimizer, RECORDS, config)
    # Policy == reference before the first update: every DPO margin is 0, so DPO = log 2.
    assert first.metrics["train/dpo"] == pytest.approx(math.log(2), abs=1e-5)
    # The bandit's raw reward is minus the per-prompt loss.
    torch.testing.assert_close(selector.reward_normalizer.histories[0][-3:], -first.loss)
    second = iterative_dpo_step(policy, reference, tokenizer, selector, encoder, optimizer, RECORDS, config)
    assert abs(second.metrics["train/dpo"] - math.log(2)) > 1e-4  # the policy moved away from the reference
    for k, v in reference.state_dict().items():
        assert torch.equal(v, frozen[k]), f"reference weight {k} changed"
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(p.grad is None for p in policy.parameters())


def test_batch_granularity_and_baselines_run_through_the_selector(tokenizer, causal_lm, reward_model):
    for kwargs, check in [
        (dict(granularity="batch"), lambda arms: len(set(arms.tolist())) == 1),
        (dict(baseline="mean"), lambda arms: (arms == ENSEMBLE).all()),
        (dict(baseline="sequential"), lambda arms: len(set(arms.tolist())) == 1),
        (dict(baseline="random", granularity="batch"), lambda arms: len(set(arms.tolist())) == 1),
    ]:
        policy, reference, selector, encoder, optimizer = _setup(tokenizer, causal_lm, reward_model, **kwargs)
        result = iterative_dpo_step(policy, reference, tokenizer, selector, encoder, optimizer, RECORDS, _config())
        assert check(result.arms), kwargs
        assert math.isfinite(result.metrics["train/loss"])


def test_a_prompt_with_a_failed_rm_score_gives_the_bandit_no_reward(tokenizer, causal_lm, reward_model):
    policy, reference = copy.deepcopy(causal_lm), copy.deepcopy(causal_lm)
    flaky = RuleArm(lambda p, r, l: [float("nan") if "poem" in x else 1.0 for x in p], name="flaky")
    encoder = ContextEncoder(causal_lm.config.hidden_size)
    selector = RewardSelector([flaky, NoisyArm(sigma=1.0)], context_dim=encoder.dim, baseline="single", skip_invalid=True,
                              feedback="pair_loss")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    result = iterative_dpo_step(policy, reference, tokenizer, selector, encoder, optimizer, RECORDS, _config())
    assert torch.isnan(result.bandit_rewards[2]) and torch.isfinite(result.bandit_rewards[:2]).all()
    assert selector.metrics()["laser/feedback_skipped"] == 1.0


@pytest.mark.parametrize("feedback", ["progress", "verifier", "spread"])
def test_other_feedback_signals(tokenizer, causal_lm, reward_model, feedback):
    policy, reference, selector, encoder, optimizer = _setup(tokenizer, causal_lm, reward_model, feedback=feedback)
    result = iterative_dpo_step(policy, reference, tokenizer, selector, encoder, optimizer, RECORDS, _config(feedback=feedback))
    assert result.bandit_rewards.shape == (3,)
    if feedback != "verifier":  # the tiny model never answers right: no mixed pairs, so NaN is allowed there
        assert torch.isfinite(result.bandit_rewards).all()
    with pytest.raises(ValueError, match="feedback"):  # the selector must be built for the signal
        iterative_dpo_step(policy, reference, tokenizer, RewardSelector(selector.rms, context_dim=encoder.dim), encoder, optimizer, RECORDS, _config(feedback=feedback))


def test_consensus_feedback_audits_inside_the_step(tokenizer, causal_lm, reward_model):
    policy, reference, selector, encoder, optimizer = _setup(tokenizer, causal_lm, reward_model, feedback="consensus", audit_fraction=1.0)
    result = iterative_dpo_step(policy, reference, tokenizer, selector, encoder, optimizer, RECORDS, _config(feedback="consensus"))
    assert result.bandit_rewards.shape == (3,) and selector.steps == 1
    assert selector.metrics()["laser/rm_passes"] == 2 * 3 * 4  # every prompt audited: both RMs scored all 4 samples


def test_a_signal_the_mode_cannot_feed_is_refused_before_training(tokenizer, causal_lm, reward_model):
    with pytest.raises(ValueError, match="unknown feedback 'majority'"):  # no answer extractor in this mode
        _config(feedback="majority")
    policy, reference, selector, encoder, optimizer = _setup(tokenizer, causal_lm, reward_model, feedback="majority")
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with pytest.raises(ValueError, match="needs a selector built with feedback='pair_loss'"):
        iterative_dpo_step(policy, reference, tokenizer, selector, encoder, optimizer, RECORDS, _config())
    assert all(torch.equal(v, before[k]) for k, v in policy.state_dict().items()) and selector.steps == 0


def test_run_loops_over_batches_and_validates(tokenizer, causal_lm, reward_model):
    policy, reference, selector, encoder, _ = _setup(tokenizer, causal_lm, reward_model)
    seen = []
    history = run_iterative_dpo(policy, reference, tokenizer, selector, encoder, RECORDS, _config(batch_size=2, iterations=2),
                                on_step=lambda step, r: seen.append(len(r.arms)))
    assert seen == [2, 1, 2, 1] and len(history) == 4
    assert "laser/arm_entropy" in history[0]
    with pytest.raises(ValueError, match="separate frozen model"):
        run_iterative_dpo(policy, policy, tokenizer, selector, encoder, RECORDS, _config())
    with pytest.raises(ValueError, match="n_samples"):
        _config(n_samples=1)
    with pytest.raises(ValueError, match="feedback"):
        _config(feedback="reward")


def _digest(texts) -> str:
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]


@pytest.mark.parametrize("feedback", ["pair_loss", "progress"])
def test_two_steps_on_a_fixed_seed_reproduce_the_pinned_outputs(tokenizer, causal_lm, reward_model, feedback):
    """Pinned before laser_rl.lm replaced this mode's sampler, log-probs, contexts and DPO (commit 8ce3136, HF
    generate + OpenRLHF DPOLoss): the refactor must give the same samples, arms, pairs and losses."""
    policy, reference, selector, encoder, optimizer = _setup(tokenizer, causal_lm, reward_model, feedback=feedback, seed=0)
    torch.manual_seed(0)
    first = iterative_dpo_step(policy, reference, tokenizer, selector, encoder, optimizer, RECORDS, _config(feedback=feedback))
    second = iterative_dpo_step(policy, reference, tokenizer, selector, encoder, optimizer, RECORDS, _config(feedback=feedback))
    assert first.arms.tolist() == [0, 1, 1] and second.arms.tolist() == [1, 0, 0]
    assert _digest(first.rollout.grouped()) == "a46b73f521f4e81f" and _digest(second.rollout.grouped()) == "b1a15343af8fea90"
    assert [[(pr.chosen, pr.rejected) for pr in g] for g in first.pairs] == [[(3, 2), (3, 0), (3, 1)], [(0, 3), (0, 2), (0, 1)], [(3, 1), (3, 0), (3, 2)]]
    assert [[(pr.chosen, pr.rejected) for pr in g] for g in second.pairs] == [[(3, 0), (3, 2), (3, 1)], [(1, 3), (1, 0), (1, 2)], [(3, 1), (3, 0), (3, 2)]]
    assert first.loss.tolist() == pytest.approx([6.29149, 6.41456, 6.39237], abs=1e-4)
    assert second.loss.tolist() == pytest.approx([6.39588, 6.43311, 6.38741], abs=1e-4)
    assert second.metrics["train/dpo"] == pytest.approx(0.692302, abs=1e-5)
    raw = selector.reward_normalizer.histories[0].tolist()
    if feedback == "pair_loss":
        assert raw == pytest.approx([-x for x in first.loss.tolist() + second.loss.tolist()], abs=1e-6)
    else:
        assert raw == pytest.approx([0.126803, 0.117640, 0.146123, 0.085208, 0.080600, 0.106919], abs=1e-5)


# ----- CLI ------------------------------------------------------------------------------------------
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def saved_models(tmp_path, tokenizer, causal_lm, reward_model):
    policy_dir, rm_dir = tmp_path / "policy", tmp_path / "rm"
    causal_lm.save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    reward_model.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    return str(policy_dir), str(rm_dir)


def test_cli_iterative_dpo_end_to_end(tmp_path, saved_models, capsys):
    policy_dir, rm_dir = saved_models
    data = _write_jsonl(tmp_path / "prompts.jsonl", RECORDS * 2)
    prefs = _write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "7", "domain": "math"},
        {"prompt": "Is Tom an animal?", "chosen": "Yes.", "rejected": "No.", "domain": "logic"},
    ])
    out = tmp_path / "run"
    assert main([
        "iterative-dpo", "--policy", policy_dir, "--reward-models", rm_dir, f"implicit:{policy_dir}", "noise",
        "--data", data, "--eval-data", data, "--warm-start", prefs, "--batch-size", "3", "--n", "3",
        "--max-new-tokens", "5", "--lr", "1e-3", "--output-dir", str(out), "--save-policy", "--device", "cpu",
    ]) == 0
    printed = capsys.readouterr().out
    assert "warm start from 2 labeled pairs" in printed and "eval accuracy after training" in printed
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "train/loss" in json.loads(lines[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and abs(sum(summary["arm_usage"].values()) - 1) < 1e-9
    state = torch.load(out / "bandit.pt", weights_only=False)
    assert state["selector"]["arm_names"] == ["rm", "policy", "noise"]
    assert int(state["selector"]["bandit"]["counts"].sum()) == 2 * 3 + 6  # 2 prior rows x 3 arms + 6 prompts
    assert (out / "policy" / "config.json").exists()


def test_cli_iterative_dpo_rejects_bad_flags(tmp_path, saved_models, capsys):
    policy_dir, rm_dir = saved_models
    data = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    with pytest.raises(SystemExit):
        main(["iterative-dpo", "--policy", policy_dir, "--reward-models", rm_dir, "--data", data, "--n", "1"])
    assert "--n must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["iterative-dpo", "--policy", policy_dir, "--reward-models", rm_dir, "noise", "--data", data, "--feedback", "verifier"])
    assert "needs an `answer`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["iterative-dpo", "--policy", policy_dir, "--reward-models", rm_dir, "--data", str(tmp_path / "missing.jsonl")])


def test_iterative_dpo_runs_without_openrlhf(tokenizer, causal_lm, monkeypatch):
    """The DPO + NLL is laser_rl.feedback's: a training step needs neither OpenRLHF nor flash-attn."""
    import sys

    for package in ("openrlhf", "flash_attn"):
        monkeypatch.setitem(sys.modules, package, None)  # importing it, or any of its submodules, now raises ImportError
    policy, reference = copy.deepcopy(causal_lm), copy.deepcopy(causal_lm)
    encoder = ContextEncoder(causal_lm.config.hidden_size)
    selector = RewardSelector([NoisyArm(seed=1), NoisyArm(seed=2)], context_dim=encoder.dim, feedback="pair_loss")
    torch.manual_seed(0)
    result = iterative_dpo_step(policy, reference, tokenizer, selector, encoder, torch.optim.AdamW(policy.parameters(), lr=1e-3),
                                RECORDS, _config(n_samples=2, max_new_tokens=3))
    assert torch.isfinite(result.loss).all() and math.isfinite(result.metrics["train/grad_norm"])
