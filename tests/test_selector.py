import math

import pytest
import torch

from laser_rl import ENSEMBLE, RewardSelector
from laser_rl.feedback import LABEL_FREE
from laser_rl.arms import ImplicitRewardArm, NoisyArm, RewardArmError, RuleArm, SequenceClassifierArm
from laser_rl.context import ContextEncoder, prompt_hidden_states
from laser_rl.synthetic import ClusteredRewardProblem


class CountingArm(RuleArm):
    """A rule arm that records every (prompt, response) it was asked to score."""

    def __init__(self, name, value):
        self.seen = []

        def fn(prompts, responses, labels):
            self.seen.extend(zip(prompts, responses))
            return [value + len(r) for r in responses]

        super().__init__(fn, name=name)


def rule_arms(k=3):
    return [CountingArm(f"rm{i}", 10.0 * i) for i in range(k)]


def test_only_the_chosen_arm_scores_each_prompts_samples():
    arms = rule_arms(3)
    sel = RewardSelector(arms, baseline="random", seed=0)
    contexts = torch.zeros(6, 1)
    chosen = sel.select(contexts)
    n = 4
    prompts = [f"p{i}" for i in range(6) for _ in range(n)]
    responses = [f"r{i}{j}" * (j + 1) for i in range(6) for j in range(n)]
    rewards = sel.score(prompts, responses, chosen.repeat_interleave(n))
    for i in range(6 * n):
        k = int(chosen[i // n])
        assert rewards[i] == 10.0 * k + len(responses[i])  # reward landed in its own slot
        assert (prompts[i], responses[i]) in arms[k].seen
        assert all((prompts[i], responses[i]) not in arms[j].seen for j in range(3) if j != k)
    assert sel.metrics()["laser/rm_passes"] == 6 * n  # one RM pass per sample


@pytest.mark.parametrize(
    "baseline,expected",
    [
        ("mean", lambda s: s.mean(0)),
        ("wco", lambda s: s.min(0).values),
        ("uwo", lambda s: s.mean(0) - 0.5 * s.var(0, unbiased=False)),
    ],
)
def test_score_ensembles_run_every_arm_and_cost_k_passes(baseline, expected):
    arms = rule_arms(3)
    sel = RewardSelector(arms, baseline=baseline)
    chosen = sel.select(torch.zeros(2, 1))
    assert (chosen == ENSEMBLE).all()
    responses = ["a", "bbb", "cc", "dddd"]
    rewards = sel.score(["p"] * 4, responses, chosen.repeat_interleave(2))
    all_scores = torch.tensor([[10.0 * k + len(r) for r in responses] for k in range(3)])
    assert torch.allclose(rewards, expected(all_scores))
    assert sel.metrics()["laser/rm_passes"] == 3 * 4  # K passes per sample


@pytest.mark.parametrize("baseline", ["random", "mean", "single"])
def test_a_baseline_with_consensus_feedback_audits_nothing_and_learns_nothing(baseline):
    sel = RewardSelector(rule_arms(3), baseline=baseline, feedback="consensus", audit_fraction=1.0)
    assert sel.consensus is None and not sel.audits
    contexts = torch.zeros(2, 1)
    chosen = sel.select(contexts)
    sel.score(["p"] * 4, ["a", "bb", "c", "dd"], chosen.repeat_interleave(2))
    passes = sel.rm_passes_total
    assert passes == (3 if baseline == "mean" else 1) * 4  # no audit passes charged
    audit = torch.randn(2, 3, 2)  # even given audit scores, a baseline has nothing to learn
    out = sel.feedback(contexts, chosen, audit_scores=audit)
    assert torch.isnan(out).all() and sel.rm_passes_total == passes


def test_nan_or_raising_arm_names_arm_and_sample():
    bad = RuleArm(lambda p, r, l: [0.0 if x != "bad" else math.nan for x in r], name="flaky")
    broken = RuleArm(lambda p, r, l: 1 / 0, name="broken")
    sel = RewardSelector([bad, broken], baseline="single")
    with pytest.raises(RewardArmError, match=r"'flaky' \(arm 0\) returned nan for sample 2 \(prompt 'q2'\)"):
        sel.score(["q0", "q1", "q2"], ["ok", "ok", "bad"], torch.zeros(3, dtype=torch.long))
    with pytest.raises(RewardArmError, match=r"'broken' \(arm 1\) failed.*division by zero"):
        sel.score(["q0"], ["ok"], torch.ones(1, dtype=torch.long))

    lenient = RewardSelector([bad, broken], baseline="single", skip_invalid=True)
    rewards = lenient.score(["q0", "q1", "q2"], ["ok", "ok", "bad"], torch.zeros(3, dtype=torch.long))
    assert torch.isnan(rewards[2]) and torch.isfinite(rewards[:2]).all()
    assert lenient.metrics()["laser/invalid_samples"] == 1


def test_invalid_samples_are_left_out_of_the_bandit_update():
    arms = [RuleArm(lambda p, r, l: [float(x) for x in r], name=f"a{i}") for i in range(2)]
    sel = RewardSelector(arms, context_dim=3, feedback="spread", skip_invalid=True, reward_warmup=1)
    X = torch.eye(3)
    chosen = sel.select(X)
    scores = torch.tensor([[1.0, 2.0], [math.nan, 1.0], [0.0, 4.0]])
    sel.feedback(X, chosen, scores=scores)
    assert int(sel.bandit.counts.sum()) == 2  # the prompt with a NaN score taught the bandit nothing
    m = sel.metrics()
    assert m["laser/feedback_skipped"] == 1
    assert torch.isfinite(sel.bandit.A_inv).all() and torch.isfinite(sel.bandit.theta).all()


def test_bad_configuration_and_input_errors():
    arms = rule_arms(2)
    with pytest.raises(ValueError, match="unknown baseline"):
        RewardSelector(arms, baseline="median")
    with pytest.raises(ValueError, match="unknown feedback"):
        RewardSelector(arms, context_dim=4, feedback="vibes")
    with pytest.raises(ValueError, match="context_dim"):
        RewardSelector(arms)
    with pytest.raises(ValueError, match="'no/such/model' does not exist"):
        RewardSelector(["no/such/model", "also-missing"], context_dim=4)
    with pytest.raises(ValueError, match="at least 2 arms"):
        RewardSelector(rule_arms(1), context_dim=4)
    sel = RewardSelector(arms, context_dim=4, feedback="pair_loss")
    with pytest.raises(ValueError, match="dimension mismatch"):
        sel.select(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="non-empty"):
        sel.select(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="empty batch"):
        sel.score([], [], torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="missing \\['ref_logps', 'response_lengths'\\]"):
        sel.feedback(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), scores=torch.zeros(1, 2), policy_logps=torch.zeros(1, 2))
    assert RewardSelector(rule_arms(1), baseline="single").num_arms == 1  # one RM is fine without a bandit


def synthetic_selector_run(granularity, steps=60, batch=32, bandit="linucb", seed=0):
    """The synthetic problem through the selector: raw rewards -> quantile normalization -> bandit."""
    problem = ClusteredRewardProblem(seed=seed)
    sel = RewardSelector(rule_arms(4), context_dim=problem.dim, bandit=bandit, granularity=granularity, seed=seed)
    hits, noise, total = 0, 0, 0
    for t in range(steps):
        X, clusters = problem.contexts(batch)
        domains = [f"cluster{c}" for c in clusters.tolist()]
        arms = sel.select(X.float(), domains)
        sel.feedback(X.float(), arms, raw_rewards=problem.rewards(X, arms))
        metrics = sel.metrics()
        if t >= 15:
            hits += int((arms == clusters).sum())
            noise += int((arms == problem.noise_arm).sum())
            total += batch
    return hits / total, noise / total, metrics


@pytest.mark.parametrize("bandit", ["linucb", "thompson"])
def test_per_prompt_selector_learns_each_clusters_best_rm(bandit):
    best, noise, metrics = synthetic_selector_run("prompt", bandit=bandit)
    assert best >= 0.9 and noise <= 0.05, (best, noise)
    for c in range(3):  # per-domain metrics show the specialisation
        assert metrics[f"laser/domain/cluster{c}/arm_frac/rm{c}"] >= 0.8
    assert 0.5 < metrics["laser/arm_entropy"] <= 1.0


def test_per_batch_selection_does_worse_on_mixed_batches():
    best_prompt, _, _ = synthetic_selector_run("prompt")
    best_batch, _, metrics = synthetic_selector_run("batch")
    assert best_prompt - best_batch > 0.4
    fractions = [v for k, v in metrics.items() if k.startswith("laser/arm_frac/")]
    assert max(fractions) == 1.0  # one arm for the whole batch


@pytest.mark.parametrize("bandit", ["linucb", "thompson", "exp3"])
def test_restored_selector_makes_the_same_future_choices(bandit, tmp_path):
    problem = ClusteredRewardProblem(seed=3)
    make = lambda: RewardSelector(  # noqa: E731
        rule_arms(3) + [NoisyArm(sigma=1.0, seed=7)], context_dim=problem.dim, bandit=bandit, seed=1
    )
    original = make()
    batches = [problem.contexts(16)[0].float() for _ in range(12)]
    raw = [torch.rand(16) for _ in range(12)]

    def step(sel, i):
        arms = sel.select(batches[i])
        scores = sel.score(["p"] * 16, ["r"] * 16, arms)
        sel.feedback(batches[i], arms, raw_rewards=raw[i])
        return arms, scores

    for i in range(6):
        step(original, i)
    original.save(str(tmp_path / "selector.pt"))
    restored = make()
    restored.load(str(tmp_path / "selector.pt"))
    for i in range(6, 12):
        arms_a, scores_a = step(original, i)
        arms_b, scores_b = step(restored, i)
        assert torch.equal(arms_a, arms_b) and torch.equal(scores_a, scores_b)
    with pytest.raises(ValueError, match="selector state is for arms"):
        RewardSelector(rule_arms(4), context_dim=problem.dim).load(str(tmp_path / "selector.pt"))


def sequence_logps(model, tokenizer, prompt, response):
    """Sum of log-probs of the response tokens given the prompt, and their count."""
    p = tokenizer(prompt).input_ids
    ids = torch.tensor([tokenizer(prompt + response).input_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None]).squeeze(1)
    return float(logp[len(p) - 1 :].sum()), ids.shape[1] - len(p)


def test_end_to_end_step_with_tiny_models(tokenizer, causal_lm, reference_lm, reward_model):
    """Real contexts, four real arm types, pair_loss feedback from real log-probs, metrics."""
    reference = reference_lm
    prompts = ["What is 2 + 3?", "All cats are animals. Tom is a cat. Is Tom an animal?", "Write a happy poem."]
    labels = ["5", "Yes", None]
    n = 3
    responses = [["The answer is 5.", "7", "5"], ["Yes.", "No.", "Maybe"], ["The sun!", "sea sun sea", "No."]]

    def exact(p, r, l):
        return [float(lab is not None and lab in resp) for resp, lab in zip(r, l)]

    arms = [
        RuleArm(exact, name="verifier"),
        SequenceClassifierArm(reward_model, tokenizer, name="seqcls"),
        ImplicitRewardArm(causal_lm, tokenizer, mode="likelihood", name="likelihood"),
        NoisyArm(sigma=1.0, seed=0),
    ]
    encoder = ContextEncoder(causal_lm.config.hidden_size, proj_dim=16)
    contexts = encoder(prompt_hidden_states(causal_lm, tokenizer, prompts))
    sel = RewardSelector(arms, context_dim=encoder.dim, feedback="pair_loss", reward_warmup=1)
    chosen = sel.select(contexts, domains=["math", "logic", "writing"])
    flat_prompts = [p for p in prompts for _ in range(n)]
    flat_responses = [r for rs in responses for r in rs]
    flat_labels = [lab for lab in labels for _ in range(n)]
    rewards = sel.score(flat_prompts, flat_responses, chosen.repeat_interleave(n), flat_labels)
    assert rewards.shape == (9,) and torch.isfinite(rewards).all()

    policy, ref, lengths = torch.zeros(3, n), torch.zeros(3, n), torch.zeros(3, n)
    for i in range(3):
        for j in range(n):
            policy[i, j], lengths[i, j] = sequence_logps(causal_lm, tokenizer, prompts[i], responses[i][j])
            ref[i, j], _ = sequence_logps(reference, tokenizer, prompts[i], responses[i][j])
    normalized = sel.feedback(
        contexts, chosen, scores=rewards.view(3, n), policy_logps=policy, ref_logps=ref, response_lengths=lengths
    )
    assert normalized.shape == (3,) and ((normalized >= 0) & (normalized <= 1)).all()
    assert int(sel.bandit.counts.sum()) == 3
    m = sel.metrics()
    assert math.isclose(sum(m[f"laser/arm_frac/{a.name}"] for a in arms), 1.0)
    assert m["laser/bandit_reward_raw"] < 0  # minus a loss
    assert m["laser/rm_passes"] == 9  # one pass per sample, the noise arm (a broken RM, called and paid for) included
    assert sum(m[f"laser/domain/math/arm_frac/{a.name}"] for a in arms) == 1.0
    assert "laser/exploration_width" in m


# ----- the one vocabulary: flags, knobs, label-free signals --------------------------------------
def test_alpha_is_each_bandits_exploration_knob():
    assert RewardSelector(rule_arms(2), context_dim=3, bandit="thompson", alpha=5.0).bandit.v == 5.0
    assert RewardSelector(rule_arms(2), context_dim=3, bandit="epsilon_greedy", alpha=0.3).bandit.epsilon == 0.3
    assert RewardSelector(rule_arms(2), context_dim=3, bandit="linucb", alpha=0.7).bandit.alpha == 0.7
    assert RewardSelector(rule_arms(2), context_dim=3, bandit="thompson").bandit.v == 0.1  # None: its own default
    with pytest.raises(ValueError, match="alpha must be a finite number"):
        RewardSelector(rule_arms(2), context_dim=3, alpha=math.nan)


def test_selector_from_flags_reads_namespaces_dataclasses_and_dicts():
    import argparse
    from dataclasses import dataclass

    from laser_rl.selector import selector_from_flags

    ns = argparse.Namespace(bandit="thompson", alpha=2.0, lam=3.0, feedback="pair_loss", beta=0.2, unrelated_flag=1)
    sel = selector_from_flags(rule_arms(2), ns, context_dim=4)
    assert sel.bandit.v == 2.0 and sel.bandit.lam == 3.0 and sel.feedback_kwargs == {"beta": 0.2}

    @dataclass
    class Flags:
        baseline: str | None = "mean"
        feedback: str = "spread"

    assert selector_from_flags(rule_arms(2), Flags()).ensemble
    sel = selector_from_flags(rule_arms(3), {"feedback": "consensus", "audit_fraction": 0.5}, context_dim=2)
    assert sel.audit_fraction == 0.5 and sel.feedback_inputs == ()


def test_feedback_takes_whatever_inputs_the_caller_has():
    sel = RewardSelector(rule_arms(2), context_dim=2, feedback="spread", reward_warmup=1)
    X = torch.eye(2)
    arms = sel.select(X)
    everything = dict(scores=torch.rand(2, 3), correct=torch.ones(2, 3, dtype=torch.bool), policy_logps=torch.zeros(2, 3),
                      answers=[["1"] * 3, ["2"] * 3], loss_before=torch.zeros(2))
    sel.feedback(X, arms, **everything)
    assert int(sel.bandit.counts.sum()) == 2
    assert sel.feedback_inputs == ("scores",)


def test_partial_label_verifier_ignores_unlabeled_prompts():
    sel = RewardSelector(rule_arms(2), context_dim=3, feedback="verifier", reward_warmup=1)
    X = torch.eye(3)
    arms = sel.select(X)
    correct = torch.tensor([[1.0, 0.0], [math.nan, math.nan], [0.0, 1.0]])  # the middle prompt has no label
    sel.feedback(X, arms, scores=torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]), correct=correct)
    assert int(sel.bandit.counts.sum()) == 2
    assert sel.metrics()["laser/feedback_skipped"] == 1


def test_majority_feedback_through_the_selector():
    sel = RewardSelector(rule_arms(2), context_dim=2, feedback="majority", reward_warmup=1)
    X = torch.eye(2)
    arms = sel.select(X)
    raw = sel.feedback(X, arms, scores=torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]),
                       answers=[["7", "7", "8"], ["yes", "no", None]])
    assert torch.isfinite(raw[0]) and torch.isnan(raw[1])  # the second prompt has no unique majority
    with pytest.raises(ValueError, match="answers"):
        sel.feedback(X, arms, scores=torch.zeros(2, 3))


def consensus_run(steps=40, seed=0, P=6, n=6, **audit):
    """Three contexts (domains); RM 0 ranks by the truth on every domain, RM 1 too but noisier, RM 2 on domain 0
    only (reversed on the others: hackable), RM 3 is noise. Consensus feedback, no labels. (With one good RM
    and one hackable RM alone, which is right off domain 0 cannot be told without labels: the second good RM
    is what makes the truth identifiable.)"""
    g = torch.Generator().manual_seed(seed)
    truth = {}

    def fn(k):
        def score(prompts, responses, labels):
            out = []
            for p, r in zip(prompts, responses):
                t = truth[(p, r)]
                domain = int(p.split(":")[0])
                noise = float(torch.randn(1, generator=g))
                out.append([t, t + 0.7 * noise, t if domain == 0 else -t, noise][k])
            return out
        return score

    rms = [RuleArm(fn(k), name=name) for k, name in enumerate(["good", "good_noisy", "hackable", "noise"])]
    sel = RewardSelector(rms, context_dim=3, alpha=0.5, reward_warmup=1, seed=seed, **audit)  # default feedback
    counts = torch.zeros(3, 4)
    for step in range(steps):
        domains = [i % 3 for i in range(P)]
        X = torch.nn.functional.one_hot(torch.tensor(domains), 3).float()
        arms = sel.select(X)
        prompts = [f"{d}:{step}:{i}" for i, d in enumerate(domains) for _ in range(n)]
        responses = [f"r{j}" for _ in range(P) for j in range(n)]
        for p, r in zip(prompts, responses):
            truth[(p, r)] = float(torch.randn(1, generator=g))
        sel.score(prompts, responses, arms.repeat_interleave(n))
        sel.feedback(X, arms)
        if step >= steps // 2:
            for d, k in zip(domains, arms.tolist()):
                counts[d, k] += 1
    return sel, counts


def test_consensus_learns_without_labels_and_counts_audit_passes():
    sel, counts = consensus_run(audit_fraction=0.5)
    assert counts[1:, 2].sum() < 0.1 * counts[1:].sum()  # off domain 0, the hackable RM is avoided
    assert counts[1:, :2].sum() > 0.9 * counts[1:].sum()  # there, the two truthful RMs get the prompts
    # (on domain 0 the "hackable" RM is exactly right, so it may rightly take a share there)
    assert counts[:, 3].sum() < 0.15 * counts.sum()  # noise avoided
    sel2, _ = consensus_run(audit_fraction=0.0, audit_warmup_steps=0, steps=3)
    assert int(sel2.bandit.counts.sum()) == 0  # nothing audited: consensus gives no feedback
    m = sel2.metrics()
    assert m["laser/audit_rm_passes"] == 0 and m["laser/rm_passes_total"] == 3 * 6 * 6  # one pass per sample


@pytest.mark.parametrize("seed", [0, 1])
def test_default_is_label_free_consensus_with_front_loaded_audits(seed):
    sel, counts = consensus_run(seed=seed)  # RewardSelector's defaults: no feedback or audit argument
    assert sel.feedback_name == "consensus" and sel.feedback_name in LABEL_FREE
    assert (sel.audit_warmup_steps, sel.audit_warmup_fraction, sel.audit_fraction) == (8, 0.4, 0.03)
    assert sel.steps == 40 and sel.current_audit_fraction == 0.03  # the warm-up is over
    assert counts[1:, 2].sum() < 0.1 * counts[1:].sum() and counts[:, 3].sum() < 0.1 * counts.sum()
    # 40 steps x 36 samples; the audits (about 40% of 8 steps' prompts, 3% after) add K - 1 = 3 passes each
    passes = sel.metrics()["laser/rm_passes_total"]
    assert 40 * 36 < passes < 40 * 36 * 1.5, passes


def test_audited_prompts_are_scored_by_every_rm_and_cost_k_passes():
    rms = rule_arms(3)
    sel = RewardSelector(rms, context_dim=2, feedback="consensus", audit_fraction=1.0)
    X = torch.eye(2)
    arms = sel.select(X)
    assert sel.last_audit.all()
    sel.score(["p0"] * 3 + ["p1"] * 3, ["a", "bb", "ccc"] * 2, arms.repeat_interleave(3))
    m = sel.metrics()
    assert m["laser/rm_passes"] == 3 * 6 and m["laser/audit_rm_passes"] == 2 * 6
    assert all(len(rm.seen) == 6 for rm in rms)
    with pytest.raises(ValueError, match="grouped per prompt"):
        sel.select(X)
        sel.score(["p"] * 4, ["a"] * 4, torch.tensor([0, 1, 0, 1]))


def test_audit_warmup_audits_the_first_steps_then_the_steady_fraction(tmp_path):
    def step(sel):
        X = torch.eye(2)
        arms = sel.select(X)
        audited = sel.last_audit.clone()
        sel.score(["p0"] * 3 + ["p1"] * 3, ["a", "bb", "ccc"] * 2, arms.repeat_interleave(3))
        sel.feedback(X, arms)
        return audited

    sel = RewardSelector(rule_arms(3), context_dim=2, feedback="consensus", audit_fraction=0.0,
                         audit_warmup_steps=2, audit_warmup_fraction=1.0)
    assert [bool(step(sel).all()) for _ in range(2)] == [True, True]
    assert sel.metrics()["laser/audit_rm_passes"] == 2 * 2 * 6  # 2 steps x 2 other RMs x 6 samples
    sel.save(str(tmp_path / "s.pt"))
    assert not step(sel).any() and sel.current_audit_fraction == 0.0  # after the warm-up: audit_fraction
    resumed = RewardSelector(rule_arms(3), context_dim=2, feedback="consensus", audit_fraction=0.0,
                             audit_warmup_steps=2, audit_warmup_fraction=1.0)
    resumed.load(str(tmp_path / "s.pt"))
    assert not step(resumed).any()  # the step count travels with the checkpoint: no second warm-up
    for bad in ({"audit_warmup_steps": -1}, {"audit_warmup_steps": 1.5}, {"audit_warmup_fraction": 1.2},
                {"audit_warmup_fraction": math.nan}):
        with pytest.raises(ValueError, match="audit_warmup"):
            RewardSelector(rule_arms(3), context_dim=2, feedback="consensus", **bad)


@pytest.mark.parametrize("feedback", ["consensus", "majority", "verifier"])
def test_selector_with_new_signals_survives_save_and_load(feedback, tmp_path):
    def run(sel, steps, start=0):
        out = []
        for step in range(start, start + steps):
            g = torch.Generator().manual_seed(step)
            X = torch.randn(4, 3, generator=g)
            arms = sel.select(X)
            sel.score([f"p{i}" for i in range(4) for _ in range(3)], [f"r{j}" * (j + 1) for _ in range(4) for j in range(3)],
                      arms.repeat_interleave(3))
            scores = torch.rand(4, 3, generator=g)
            sel.feedback(X, arms, scores=scores, correct=scores > 0.5, answers=[["1", "1", str(step % 2)]] * 4)
            out.append(arms)
        return out

    make = lambda: RewardSelector(rule_arms(3), context_dim=3, feedback=feedback, audit_fraction=0.5, seed=2)  # noqa: E731
    a = make()
    run(a, 6)
    a.save(str(tmp_path / "s.pt"))
    b = make()
    b.load(str(tmp_path / "s.pt"))
    for x, y in zip(run(a, 6, 6), run(b, 6, 6)):
        assert torch.equal(x, y)
    assert a.steps == b.steps == 12
