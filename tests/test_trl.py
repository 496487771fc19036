"""LASeR inside TRL's GRPOTrainer, end to end on the CPU: real TRL, a tiny local Llama, a locally trained tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from laser_rl.context import ContextEncoder  # noqa: E402
from laser_rl.integrations.trl import SELECTOR_FILE, LaserRewardFunction, exploit_arms  # noqa: E402
from laser_rl.selector import RewardSelector  # noqa: E402

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from conftest import build_causal_lm, build_tokenizer  # noqa: E402

N = 2  # completions per prompt
PROMPTS = ["What is 2 + 3?", "Is Tom an animal?", "What is 7 + 1?", "Write a poem.", "Anna has 3 apples.", "What is 4 + 4?"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


class Counting:
    """A rule RM that counts the completions it scores (OpenRLHF's batch signature)."""

    def __init__(self, name, fn):
        self.__name__, self.fn, self.calls, self.prompts = name, fn, 0, set()

    def __call__(self, prompts, responses, labels):
        self.calls += len(responses)
        self.prompts.update(prompts)
        return [float(self.fn(r, lab)) for r, lab in zip(responses, labels or [None] * len(responses))]


def rms():
    return [
        Counting("length", lambda r, lab: len(r) / 10.0),
        Counting("digits", lambda r, lab: sum(c.isdigit() for c in r)),
        Counting("exact", lambda r, lab: lab is not None and str(lab) in r),
    ]


def dataset(chat: bool = False):
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS] if chat else PROMPTS
    return datasets.Dataset.from_dict({
        "prompt": prompts,
        "answer": ["5", "Yes", "8", "sea", "7", "8"],
        "domain": ["math", "logic", "math", "chat", "math", "math"],
    })


def config(out, steps=3, beta=0.0, **kw):
    from trl import GRPOConfig

    base = dict(
        output_dir=str(out), per_device_train_batch_size=4, num_generations=N, max_completion_length=6,
        max_steps=steps, learning_rate=1e-3, logging_steps=1, save_strategy="steps", save_steps=2,
        report_to="none", use_cpu=True, seed=0, beta=beta, temperature=1.0, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    base.update(kw)
    return GRPOConfig(**base)


def make_laser(tokenizer, feedback="spread", n=N, **kw):
    hidden = 32  # conftest's tiny Llama
    encoder = ContextEncoder(hidden, proj_dim=8, seed=0)
    selector = RewardSelector(rms(), context_dim=encoder.dim, feedback=feedback, seed=0,
                              **kw.pop("selector_kwargs", {}))
    return LaserRewardFunction(selector, num_generations=n, encoder=encoder, **kw)


def train(out, way="plain", steps=3, resume=None, chat=False, feedback="spread", beta=0.0, laser_kwargs=None, **cfg):
    from trl import GRPOTrainer

    from laser_rl.integrations.trl import LaserGRPOTrainer

    tokenizer = build_tokenizer("bpe")
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    policy = build_causal_lm(tokenizer, seed=0)
    if beta > 0:  # TRL builds the reference model from the policy's path: save the tiny Llama locally
        path = Path(out).parent / "policy"
        if not path.exists():
            policy.save_pretrained(path)
        policy = str(path)
    laser = make_laser(tokenizer, feedback=feedback, **(laser_kwargs or {}))
    args = config(out, steps=steps, beta=beta, **cfg)
    if way == "plain":
        trainer = GRPOTrainer(model=policy, reward_funcs=[laser], args=args, train_dataset=dataset(chat),
                              processing_class=tokenizer, callbacks=[laser.callback()])
    else:
        trainer = LaserGRPOTrainer(model=policy, args=args, train_dataset=dataset(chat), processing_class=tokenizer,
                                   laser=laser)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, laser


def laser_logs(trainer, prefix="laser/"):
    return [row for row in trainer.state.log_history if any(k.startswith(prefix) for k in row)]


@pytest.mark.parametrize("way,feedback,beta", [("plain", "spread", 0.0), ("subclass", "pair_loss", 0.1)])
def test_three_steps_then_resume_continues_the_same_bandit(tmp_path, way, feedback, beta):
    trainer, laser = train(tmp_path / "full", way, steps=3, feedback=feedback, beta=beta)
    sel = laser.selector
    assert sel.steps == 3 and sel.bandit.num_updates == 3  # one bandit update per step
    n_completions = 3 * 4  # steps x per-device batch
    assert sum(rm.fn.calls for rm in sel.rms) == n_completions  # exactly one RM pass per completion
    assert sel.rm_passes_total == n_completions
    logs = laser_logs(trainer)
    assert len(logs) == 3 and all(row["laser/rm_passes"] == 4 for row in logs)
    assert any(k.startswith("laser/arm_frac/") for k in logs[0]) and "laser/bandit_reward_norm" in logs[-1]
    assert os.path.isfile(tmp_path / "full" / "checkpoint-2" / SELECTOR_FILE)
    assert set(trainer._logs["extra"]["laser/rm"]) <= set(sel.names)  # the chosen RM per completion, by name
    final_arms = laser.last_arms.clone()

    # Resume from checkpoint-2: the selector file is read back and step 3 makes the same choices.
    resumed, laser2 = train(tmp_path / "full", way, steps=3, feedback=feedback, beta=beta,
                            resume=str(tmp_path / "full" / "checkpoint-2"))
    assert laser2.loaded_from == str(tmp_path / "full" / "checkpoint-2")
    assert laser2.selector.steps == 3 and laser2.selector.bandit.num_updates == 3
    assert torch.equal(laser2.last_arms, final_arms)
    a, b = sel.state_dict(), laser2.selector.state_dict()
    assert torch.allclose(a["bandit"]["A"], b["bandit"]["A"]) and torch.allclose(a["bandit"]["b"], b["bandit"]["b"])


def test_chat_prompts_and_an_eval_pass_that_never_updates_the_bandit(tmp_path):
    trainer, laser = train(tmp_path, "plain", steps=2, chat=True, feedback="verifier", save_strategy="no",
                           laser_kwargs=dict(label_column="answer", domain_column="domain",
                                             answer_extractor=lambda text: text.strip()[:1] or None))
    sel = laser.selector
    assert sel.steps == 2
    assert set().union(*(rm.fn.prompts for rm in sel.rms)) <= set(PROMPTS)  # RMs see the user's text, not the template
    assert any("laser/domain/math/arm_frac/length" in row for row in trainer.state.log_history)
    before = sel.state_dict()
    contexts = torch.randn(3, laser.encoder.dim)
    expected = exploit_arms(sel, contexts)
    metrics = trainer.evaluate(eval_dataset=dataset(chat=True).select(range(4)))
    after = sel.state_dict()
    assert sel.steps == 2 and torch.equal(before["bandit"]["A"], after["bandit"]["A"])
    assert torch.equal(before["bandit"]["generator"], after["bandit"]["generator"])  # no exploration draw
    assert torch.equal(exploit_arms(sel, contexts), expected)
    assert "eval_laser/rm_passes" in metrics


def test_pair_loss_with_beta_zero_is_a_clear_error(tmp_path):
    from laser_rl.integrations.trl import LaserGRPOTrainer

    tokenizer = build_tokenizer("bpe")
    laser = make_laser(tokenizer, feedback="pair_loss")
    with pytest.raises(ValueError, match="beta"):
        LaserGRPOTrainer(model=build_causal_lm(tokenizer), args=config(tmp_path, beta=0.0), train_dataset=dataset(),
                         processing_class=tokenizer, laser=laser)


def states_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_two_ranks_with_a_group_split_across_them_keep_identical_selectors(tmp_path):
    build_causal_lm(build_tokenizer("bpe"), seed=0).save_pretrained(tmp_path / "policy")  # pair_loss's reference
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "trl_two_ranks.py"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    for way in ("plain", "pair_loss"):
        r0, r1 = (torch.load(tmp_path / f"{way}_rank{r}.pt", weights_only=False) for r in (0, 1))
        assert r0["world"] == r1["world"] == 2
        assert states_equal(r0["state"], r1["state"]), way  # bandit, normalizer, RNG, step and RM-pass counts
        assert r0["state"]["steps"] == 3 and r0["state"]["bandit"]["num_updates"] == 3
        # 3 steps x 2 ranks x 3 completions, each scored once, on its own rank
        assert sum(r0["calls"]) + sum(r1["calls"]) == 18 == r0["state"]["rm_passes_total"]
        assert r0["logged_rm_passes"] == [6.0, 6.0, 6.0]  # summed over the ranks, not averaged
        assert torch.equal(r0["last_arms"], r1["last_arms"])


# ----- the reward call on its own (no trainer): fast checks of each feedback path and error ---------------
def bound(feedback="spread", n=N, **kw):
    tokenizer = build_tokenizer("bpe")
    laser = make_laser(tokenizer, feedback=feedback, n=n, **kw)
    laser.bind(build_causal_lm(tokenizer).train(), tokenizer, num_generations=n)
    return laser


def call(laser, completions=("5", "6", "Yes", "No"), **columns):
    """One training-mode reward call on len(completions) / n prompts; returns (rewards, logged columns and metrics)."""
    extra, n = {}, laser.num_generations
    rows = [p for p in PROMPTS[: len(completions) // n] for _ in range(n)]
    out = laser(rows, list(completions), completion_ids=[[1, 2]] * len(rows),
                log_extra=lambda col, values: extra.setdefault(col, []).extend(values),
                log_metric=lambda k, v: extra.setdefault(k, v), **columns)
    return out, extra


def test_ensemble_names_its_column_and_scores_with_every_rm():
    laser = bound(selector_kwargs=dict(baseline="mean"))
    rewards, extra = call(laser)
    assert extra["laser/rm"] == ["ensemble:mean"] * 4  # never "arm -1"
    assert extra["laser/rm_passes"] == 4 * 3 and len(rewards) == 4


def test_majority_and_verifier_from_label_column_feed_the_bandit():
    extract = lambda text: text.strip() or None  # noqa: E731
    laser = bound("majority", n=4, answer_extractor=extract)
    _, extra = call(laser, completions=("5", "5", "5", "6", "Yes", "No", "No", "No"))
    assert laser.selector.bandit.num_updates == 1 and extra["laser/feedback_skipped"] == 0.0
    laser = bound("verifier", label_column="answer", answer_extractor=extract)
    _, extra = call(laser, completions=("5", "5", "Yes", "No"), answer=["5", "5", "Yes", "Yes"])
    # prompt 1: both right (no pair to rank) -> skipped; prompt 2: one right, one wrong -> learned from
    assert laser.selector.bandit.num_updates == 1 and extra["laser/feedback_skipped"] == 1.0


def test_verifier_from_a_per_completion_correct_column():
    laser = bound("verifier", correct_column="is_correct")
    _, extra = call(laser, is_correct=[True, False, None, None])  # the second prompt is unlabeled: no signal
    assert laser.selector.bandit.num_updates == 1 and extra["laser/feedback_skipped"] == 1.0


def test_consensus_audits_inside_the_reward_call():
    laser = bound("consensus", selector_kwargs=dict(audit_fraction=1.0))
    _, extra = call(laser)
    assert extra["laser/audit_rm_passes"] == 4 * 2  # every prompt audited: the two other RMs score each completion
    assert extra["laser/rm_passes"] == 4 * 3


@pytest.mark.parametrize("kw,match", [
    (dict(feedback="verifier"), "correct_column"),
    (dict(feedback="majority"), "answer_extractor"),
    (dict(feedback="progress"), "losses before and after"),
])
def test_missing_inputs_are_clear_errors_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        make_laser(build_tokenizer("bpe"), **kw)


def test_binding_errors_name_what_to_change(monkeypatch):
    import laser_rl.integrations.trl as laser_trl

    tokenizer = build_tokenizer("bpe")
    policy = build_causal_lm(tokenizer)
    encoder = ContextEncoder(32, proj_dim=8, seed=0)
    with monkeypatch.context() as patch:  # several ranks: the default (consensus) cannot audit a split batch
        patch.setattr(laser_trl, "_rank_world", lambda: (0, 2))
        default = LaserRewardFunction(RewardSelector(rms(), context_dim=encoder.dim), num_generations=N, encoder=encoder)
        with pytest.raises(ValueError, match="consensus.*several ranks.*feedback='verifier'"):
            default.bind(policy, tokenizer, num_generations=N)
        assert default.policy is None
    with pytest.raises(ValueError, match="LaserGRPOTrainer"):
        make_laser(tokenizer, feedback="pair_loss").bind(policy, tokenizer, num_generations=N)
    with pytest.raises(ValueError, match="num_generations"):
        make_laser(tokenizer).bind(policy, tokenizer, num_generations=N + 1)
    with pytest.raises(ValueError, match="encoder"):
        LaserRewardFunction(RewardSelector(rms(), context_dim=9), num_generations=N)
    wrong_width = LaserRewardFunction(RewardSelector(rms(), context_dim=9), N, encoder=ContextEncoder(16, proj_dim=8))
    with pytest.raises(ValueError, match="hidden_size is 32"):
        wrong_width.bind(policy, tokenizer, num_generations=N)
    assert wrong_width.policy is None  # nothing bound
    with pytest.raises(RuntimeError, match="callback"):
        make_laser(tokenizer)(["a", "a"], ["x", "y"])


def test_contexts_from_trl_prompt_ids_match_the_core_encoder():
    from laser_rl.context import prompt_hidden_states
    from laser_rl.integrations.trl import prompt_states_from_ids, trl_prompt_ids

    tokenizer = build_tokenizer("bpe")
    policy = build_causal_lm(tokenizer)
    ids = trl_prompt_ids(tokenizer, PROMPTS[:3])
    batched = prompt_states_from_ids(policy, ids, batch_size=2)  # left-padded batches
    assert torch.allclose(batched, prompt_hidden_states(policy, tokenizer, PROMPTS[:3]), atol=1e-5)
    assert torch.allclose(batched[2], prompt_states_from_ids(policy, ids[2:])[0], atol=1e-5)  # alone == batched


@pytest.mark.parametrize("kw", [dict(bandit="linucb"), dict(bandit="thompson"), dict(bandit="exp3"), dict(bandit="ucb1"),
                                dict(baseline="single", single_arm=2), dict(baseline="sequential"), dict(baseline="random"),
                                dict(baseline="mean")])
def test_exploit_arms_changes_no_state(kw):
    sel = RewardSelector(rms(), context_dim=5, feedback="spread", seed=0, **kw)
    X = torch.randn(4, 5)
    for _ in range(3):  # a few learning steps so the estimates differ between arms
        arms = sel.select(X)
        sel.feedback(X, arms, scores=torch.rand(4, N))
    before = sel.state_dict()
    arms = exploit_arms(sel, X)
    assert states_equal(before, sel.state_dict()) and arms.shape == (4,)
    if sel.bandit is None:
        assert (arms == -1).all()
    elif kw.get("bandit") in ("linucb", "thompson"):
        assert torch.equal(arms, sel.bandit.scores(X)[0].argmax(dim=1))  # the ridge estimate's best arm, no bonus
    elif "single_arm" in kw:
        assert (arms == 2).all()
    elif kw.get("baseline") == "sequential":
        assert torch.equal(arms, sel.select(X))  # the arm the next training batch gets


def test_save_load_round_trip_and_a_missing_checkpoint_is_a_clear_error(tmp_path):
    laser = bound()
    call(laser)
    laser.save(str(tmp_path / "checkpoint-1"))
    other = bound()
    before = other.selector.state_dict()
    with pytest.raises(FileNotFoundError, match=SELECTOR_FILE):
        other.load(str(tmp_path / "nowhere"))
    assert states_equal(before, other.selector.state_dict()) and other.loaded_from is None
    other.load(str(tmp_path / "checkpoint-1"))
    assert states_equal(laser.selector.state_dict(), other.selector.state_dict())
    assert torch.equal(laser.encoder.projection, other.encoder.projection)
