import hashlib
import json
import random

import pytest
import torch

import laser_rl.best_of_n as bon
from laser_rl import RewardSelector
from laser_rl.arms import RuleArm
from laser_rl.best_of_n import (
    BestOfNConfig,
    CachedArm,
    answer_accuracy,
    choose_best,
    exact_match,
    run_best_of_n,
    task_score,
    token_f1,
)
from laser_rl.cli import main
from laser_rl.context import ContextEncoder
from laser_rl.lm import Rollout, prompt_contexts


def length_rm(prompts, responses, labels):
    return [float(len(r)) for r in responses]


# ----- metrics ---------------------------------------------------------------------------------------
def test_task_metrics_by_hand():
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(2 * 1.0 * 0.75 / 1.75)  # 3 of 4 vs 3 of 3
    assert token_f1("Paris", ["London", "paris."]) == 1.0 and token_f1("", "x") == 0.0
    assert exact_match("The Answer!", "answer") == 1.0 and exact_match("answer is", "answer") == 0.0
    assert answer_accuracy("2 + 3 = 5, so the answer is 5.", "5") == 1.0
    assert answer_accuracy("5 apples, then 7", "5") == 0.0  # the last number counts
    assert answer_accuracy("1,250 people", 1250) == 1.0
    assert answer_accuracy("Yes, Tom is an animal.", "yes") == 1.0 and answer_accuracy("yesterday", "yes") == 0.0
    assert task_score("x y", "x y z", "f1") == pytest.approx(0.8)
    with pytest.raises(ValueError, match="unknown metric"):
        task_score("a", "a", "bleu")


def test_choose_best_and_cache():
    assert choose_best(torch.tensor([[0.1, 0.9, 0.9], [float("nan"), -1.0, -2.0]])).tolist() == [1, 1]
    arm = CachedArm(RuleArm(length_rm))
    arm.score(["p", "p"], ["aa", "b"])
    assert arm.score(["p", "q"], ["aa", "b"]).tolist() == [2.0, 1.0] and arm.computed == 3


# ----- best-of-n -------------------------------------------------------------------------------------
RECORDS = [
    {"prompt": "What is 2 + 3?", "answer": "5", "domain": "math"},
    {"prompt": "Is Tom an animal?", "answer": "yes", "domain": "logic"},
    {"prompt": "What is 7 + 1?", "answer": "8", "domain": "math"},
]


def test_best_of_n_picks_the_rms_top_sample(tokenizer, causal_lm):
    arms = [CachedArm(RuleArm(length_rm, name="longest")), CachedArm(RuleArm(lambda p, r, l: [-len(x) for x in r], name="shortest"))]
    encoder = ContextEncoder(causal_lm.config.hidden_size)
    selectors = {
        "laser": RewardSelector(arms, context_dim=encoder.dim, feedback="spread"),  # unused: best-of-n feeds best_nll
        "single": RewardSelector(arms, context_dim=encoder.dim, baseline="single"),
        "mean": RewardSelector(arms, context_dim=encoder.dim, baseline="mean"),
    }
    result = run_best_of_n(causal_lm, tokenizer, selectors, encoder, RECORDS, BestOfNConfig(n=4, max_new_tokens=8, batch_size=2))
    assert len(result.predictions) == 3 and set(result.scores) == {"laser", "single", "mean", "first_sample", "oracle"}
    for row in result.predictions:
        lengths = [len(r) for r in row["responses"]]
        # The single-RM baseline (arm 0: longest) must answer with the longest sample.
        assert row["single"]["chosen"] == lengths.index(max(lengths))
        # LASeR answers with the top sample of whichever RM it chose, scored by that RM.
        sign = 1 if row["laser"]["arm"] == "longest" else -1
        assert row["laser"]["rm_scores"] == [sign * float(x) for x in lengths]
        assert row["laser"]["chosen"] == max(range(4), key=lambda j: (row["laser"]["rm_scores"][j], -j))
    assert result.rm_passes == {"laser": 12, "single": 12, "mean": 24}  # one RM per sample vs. all K
    assert result.scores["oracle"] >= max(result.scores[s] for s in ("laser", "single", "mean"))
    assert set(result.by_domain) == {"math", "logic"}


def test_bandit_reward_is_minus_the_per_token_nll_of_the_chosen_response(tokenizer, causal_lm, monkeypatch):
    monkeypatch.setattr(bon, "sample", _fake_sampler)
    arms = [CachedArm(RuleArm(length_rm, name="a")), CachedArm(RuleArm(lambda p, r, l: [0.0] * len(r), name="b"))]
    encoder = ContextEncoder(causal_lm.config.hidden_size)
    selector = RewardSelector(arms, context_dim=encoder.dim, feedback="spread")
    result = run_best_of_n(causal_lm, tokenizer, {"laser": selector}, encoder, RECORDS, BestOfNConfig(n=4))
    expected = []
    for row in result.predictions:
        prompt = RECORDS[row["index"]]["prompt"]
        response = row["responses"][row["laser"]["chosen"]]
        prompt_ids, response_ids = tokenizer(prompt)["input_ids"], tokenizer(response, add_special_tokens=False)["input_ids"]
        with torch.no_grad():  # by hand: one plain forward over prompt + response, log-softmax at the response positions
            ids = torch.tensor([prompt_ids + response_ids])
            logp = causal_lm(ids).logits.log_softmax(-1)[0, :-1].gather(1, ids[0, 1:, None]).squeeze(1)[len(prompt_ids) - 1 :]
        expected.append(float(logp.mean()))  # mean log-prob per token = minus the normalized NLL
    assert selector.reward_normalizer.histories[0].tolist() == pytest.approx(expected, abs=1e-5)


def _fake_sampler(model, tokenizer, prompts, n, *args, **kwargs):
    """Two right and two wrong answers per prompt, so only the choice of RM decides the outcome."""
    responses = []
    for p in prompts:
        right, wrong = ("yes", "no") if "animal" in p else (str(eval(p.split("is ")[1].rstrip("?"))), "99")
        responses.append([f"The answer is {wrong}", f"The answer is {right}.", f"The answer is {wrong}!", f"The answer is {right}"][:n])
    rollout = Rollout.from_texts(tokenizer, prompts, responses)
    rollout.context_hidden = prompt_contexts(model, tokenizer, prompts)  # what sampling's prefill would give
    return rollout


def test_laser_with_verifier_feedback_beats_random_and_ensemble_on_conflicting_rms(tokenizer, causal_lm, monkeypatch):
    monkeypatch.setattr(bon, "sample", _fake_sampler)
    rng = random.Random(0)
    records = []
    for i in range(48):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        records.append({"prompt": f"What is {a} + {b}?", "answer": str(a + b), "domain": "math"} if i % 2 == 0 else
                       {"prompt": "All cats are animals. Tom is a cat. Is Tom an animal? Answer", "answer": "yes", "domain": "logic"})

    # Conflicting RMs (the paper's point): each is right on one domain and exactly wrong on the other.
    def rm_math(prompts, responses, labels):
        return [float("99" not in r) if "animal" not in p else float("no" in r) for p, r in zip(prompts, responses)]

    def rm_logic(prompts, responses, labels):
        return [float("yes" in r) if "animal" in p else float("99" in r) for p, r in zip(prompts, responses)]

    arms = [CachedArm(RuleArm(rm_math)), CachedArm(RuleArm(rm_logic))]
    encoder = ContextEncoder(causal_lm.config.hidden_size)
    selectors = {name: RewardSelector(arms, context_dim=encoder.dim, baseline=baseline, feedback="spread")
                 for name, baseline in (("laser", None), ("random", "random"), ("mean", "mean"))}
    result = run_best_of_n(causal_lm, tokenizer, selectors, encoder, records, BestOfNConfig(n=4, batch_size=4, feedback="best_metric"))
    assert result.metric == "accuracy" and result.scores["oracle"] == 1.0
    assert result.scores["laser"] > 0.8 > result.scores["random"] + 0.2
    assert result.scores["mean"] == 0.0  # the scores cancel: every tie goes to sample 0, a wrong answer
    late = result.predictions[-16:]
    assert all(row["laser"]["arm"] == ("rm_math" if row["domain"] == "math" else "rm_logic") for row in late)


def test_long_contexts_are_truncated_and_counted(tokenizer, causal_lm):
    long_context = "The quick brown fox jumps over the lazy dog. " * 60
    records = [{"prompt": "Who jumps?", "answer": "the fox", "context": long_context}, {"prompt": "What is 2 + 3?", "answer": "5"}]
    arms = [CachedArm(RuleArm(length_rm, name="a")), CachedArm(RuleArm(length_rm, name="b"))]
    encoder = ContextEncoder(causal_lm.config.hidden_size)
    selectors = {"random": RewardSelector(arms, context_dim=encoder.dim, baseline="random")}
    with pytest.warns(UserWarning, match="truncated in the middle"):
        result = run_best_of_n(causal_lm, tokenizer, selectors, encoder, records, BestOfNConfig(n=2, max_new_tokens=4, max_prompt_tokens=64))
    assert result.num_truncated == 1 and result.metric == "f1"  # a context makes it QA


def test_best_of_n_rejects_bad_input(tokenizer, causal_lm):
    arms = [RuleArm(length_rm, name="a"), RuleArm(length_rm, name="b")]
    encoder = ContextEncoder(causal_lm.config.hidden_size)
    selectors = {"random": RewardSelector(arms, baseline="random")}
    with pytest.raises(ValueError, match="lack a prompt or an answer"):
        run_best_of_n(causal_lm, tokenizer, selectors, encoder, [{"prompt": "hi"}], BestOfNConfig())
    with pytest.raises(ValueError, match="reserved"):
        run_best_of_n(causal_lm, tokenizer, {"oracle": selectors["random"]}, encoder, RECORDS, BestOfNConfig())
    with pytest.raises(ValueError, match="consensus feedback.*feedback='spread'"):  # RewardSelector's default audits
        run_best_of_n(causal_lm, tokenizer, {"laser": RewardSelector(arms, context_dim=encoder.dim)}, encoder, RECORDS, BestOfNConfig())
    for old_or_wrong in ("loss", "nll", "verifier", "pair_loss"):  # best-of-n's signals are named for the RM's best response
        with pytest.raises(ValueError, match="feedback"):
            BestOfNConfig(feedback=old_or_wrong)


def test_fixed_seed_reproduces_the_pinned_choices_and_rewards(tokenizer, causal_lm):
    """Pinned before laser_rl.lm replaced this mode's sampler, contexts and log-probs (commit 8ce3136, HF generate):
    the same samples, the same RM choices and the same best_nll rewards."""
    arms = [CachedArm(RuleArm(length_rm, name="longest")), CachedArm(RuleArm(lambda p, r, l: [-len(x) for x in r], name="shortest"))]
    encoder = ContextEncoder(causal_lm.config.hidden_size)
    selectors = {"laser": RewardSelector(arms, context_dim=encoder.dim, feedback="spread"), "random": RewardSelector(arms, context_dim=encoder.dim, baseline="random")}
    records = [
        {"prompt": "What is 2 + 3?", "answer": "5", "domain": "math"},
        {"prompt": "All cats are animals. Is Tom an animal?", "answer": "yes", "domain": "logic"},
        {"prompt": "Write a short happy poem.", "answer": "sea", "domain": "chat"},
    ]
    result = run_best_of_n(causal_lm, tokenizer, selectors, encoder, records * 2, BestOfNConfig(n=4, max_new_tokens=8, batch_size=2))
    responses = [row["responses"] for row in result.predictions]
    assert hashlib.sha256(json.dumps(responses).encode()).hexdigest()[:16] == "67f7bd01a3110bc8"
    assert [(row["laser"]["arm"], row["laser"]["chosen"], row["random"]["arm"], row["random"]["chosen"]) for row in result.predictions] == [
        ("longest", 3, "longest", 3), ("shortest", 0, "shortest", 0), ("longest", 2, "shortest", 3),
        ("shortest", 0, "longest", 1), ("longest", 1, "shortest", 2), ("shortest", 0, "shortest", 0),
    ]
    raw = selectors["laser"].reward_normalizer.histories[0].tolist()
    assert raw == pytest.approx([-5.69727, -5.72224, -5.69116, -5.74877, -5.67718, -5.70725], abs=1e-4)


# ----- CLI -------------------------------------------------------------------------------------------
def test_cli_best_of_n_end_to_end(tmp_path, tokenizer, causal_lm, reward_model, capsys):
    policy_dir, rm_dir = tmp_path / "policy", tmp_path / "rm"
    causal_lm.save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    reward_model.save_pretrained(rm_dir)
    tokenizer.save_pretrained(rm_dir)
    rows = [
        {"prompt": "Who jumps?", "answer": ["the fox", "fox"], "context": "The quick brown fox jumps. " * 40, "domain": "single_doc"},
        {"prompt": "What is over the dog?", "answer": "the fox", "context": "The fox jumps over the lazy dog.", "domain": "multi_doc"},
        {"prompt": "Who is lazy?", "answer": "the dog", "context": "The lazy dog sleeps.", "domain": "single_doc"},
    ]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "bon"
    with pytest.warns(UserWarning, match="truncated"):
        assert main([
            "best-of-n", "--policy", str(policy_dir), "--reward-models", str(rm_dir), "noise", f"implicit:{policy_dir}",
            "--data", str(data), "--n", "3", "--max-new-tokens", "4", "--max-prompt-tokens", "80",
            "--output-dir", str(out), "--device", "cpu",
        ]) == 0
    printed = capsys.readouterr().out
    assert "metric: f1" in printed and "1 of 3 prompts were truncated" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["scores"]) == {"laser", "random", "mean", "first_sample", "oracle"}
    assert set(results["by_domain"]) == {"single_doc", "multi_doc"} and results["num_truncated"] == 1
    assert results["rm_passes"]["mean"] > results["rm_passes"]["laser"]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 3
    with pytest.raises(SystemExit):
        main(["best-of-n", "--policy", str(policy_dir), "--reward-models", "noise", "--data", str(data), "--n", "0"])
