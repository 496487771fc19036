"""benchmarks/demo_bandit_replay.py on a small synthetic log: every signal replays, the JSON rows are as documented."""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import sys

import pytest
import torch

from laser_rl.selector import RewardSelector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_replay():
    spec = importlib.util.spec_from_file_location("demo_bandit_replay", os.path.join(ROOT, "benchmarks", "demo_bandit_replay.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def synthetic_log(prompts=24, n=6, hidden=12, seed=0):
    """Three domains with separable hidden states; "good" and "good2" rank right everywhere, "calc" on arithmetic
    only (blind elsewhere), "likely" prefers what the policy likes (near blind on logic), "noise" is noise."""
    g = torch.Generator().manual_seed(seed)
    log = {}
    for k, domain in enumerate(("arithmetic", "word", "logic")):
        correct = torch.rand(prompts, n, generator=g) < 0.5
        truth = correct.float() + 0.3 * torch.randn(prompts, n, generator=g)
        logps = -5 + (truth if domain != "logic" else 0.1 * truth) + 0.5 * torch.randn(prompts, n, generator=g)
        scores = {
            "good": truth + 0.4 * torch.randn(prompts, n, generator=g),
            "good2": truth + 0.6 * torch.randn(prompts, n, generator=g),
            "calc": correct.float() if domain == "arithmetic" else torch.zeros(prompts, n),
            "likely": logps / 6,
            "noise": torch.randn(prompts, n, generator=g),
        }
        hidden_states = torch.randn(prompts, hidden, generator=g) * 0.1
        hidden_states[:, k] += 3.0
        answers = [["right" if c else f"wrong{j % 2}" for j, c in enumerate(row.tolist())] for row in correct]
        log[domain] = {"hidden": hidden_states, "correct": correct, "logps": logps, "lengths": torch.full((prompts, n), 4.0),
                       "answers": answers, "scores": scores}
    return log


def test_every_signal_replays_and_writes_the_documented_rows(tmp_path):
    replay = load_replay()
    path = tmp_path / "log.pt"
    torch.save(synthetic_log(), path)
    out = tmp_path / "rows.json"
    rows = replay.main(["--log", str(path), "--feedback", "all", "--seeds", "2", "--steps", "6", "--settings", "0.6,1.0",
                        "--json", str(out)])
    assert [r["feedback"] for r in rows] == list(replay.SIGNALS)
    picked = replay.main(["--log", str(path), "--feedback", "consensus_front,verifier", "--seeds", "2", "--steps", "6",
                          "--settings", "0.6,1.0"])
    assert [r["feedback"] for r in picked] == ["consensus_front", "verifier"]  # a comma-separated list, in its order
    saved = json.load(open(out))
    assert isinstance(saved, list) and len(saved) == len(replay.SIGNALS)
    for row in saved:
        assert {"feedback", "label_free", "default", "alpha", "lam", "best_rm", "noise_share", "both", "rm_passes_per_sample"} <= set(row)
        assert 0 <= row["best_rm"] <= 1 and 0 <= row["noise_share"] <= 1 and row["both"] <= row["best_rm"]
        # Each domain's arm shares sum to 1; with as many prompts per domain, their noise mean is the noise share.
        assert all(abs(sum(per.values()) - 1) < 1e-3 for per in row["arm_share"].values())
        noise_by_domain = [per["noise"] for per in row["arm_share"].values()]
        assert abs(sum(noise_by_domain) / len(noise_by_domain) - row["noise_share"]) < 1e-3
    by = {r["feedback"]: r for r in saved}
    assert not by["verifier"]["label_free"] and not by["verifier_25"]["label_free"] and by["consensus"]["label_free"]
    assert sum(r["default"] for r in saved) == 1 and by["consensus_front"]["default"]
    # The recommended row is what RewardSelector runs when given no feedback or audit arguments.
    recommended = replay.SIGNALS[replay.RECOMMENDED[0]]
    defaults = {n: p.default for n, p in inspect.signature(RewardSelector).parameters.items()}
    assert (recommended.feedback, recommended.audit_fraction, recommended.audit_warmup_steps, recommended.audit_warmup_fraction) == (
        defaults["feedback"], defaults["audit_fraction"], defaults["audit_warmup_steps"], defaults["audit_warmup_fraction"])
    # Audits cost extra passes, the other signals one pass per sample.
    assert by["verifier"]["rm_passes_per_sample"] == 1.0
    assert 1.0 <= by["consensus"]["rm_passes_per_sample"] <= 1.0 + 3 * 0.5


def test_consensus_finds_a_truthful_rm_without_labels_where_pair_loss_prefers_the_likely_one():
    replay = load_replay()
    log = synthetic_log(prompts=48, seed=1)
    truthful = {"good", "good2", "calc"}
    for name, expect_truthful in (("consensus_20", True), ("pair_loss", False)):
        hits, noise = 0, 0.0
        for seed in range(4):
            names, counts, _ = replay.replay(log, replay.SIGNALS[name], 0.6, 1.0, seed, steps=24)
            hits += names[int(counts["logic"].argmax())] in truthful
            noise += float(sum(c[names.index("noise")] for c in counts.values()) / sum(c.sum() for c in counts.values()))
        if expect_truthful:  # on logic the likelihood RM is blind; consensus finds a truthful RM
            assert hits >= 3 and noise / 4 < 0.1, (name, hits, noise)
        else:  # the NLL term rewards what the policy already likes
            assert hits <= 1, (name, hits)


def test_consensus_on_the_whole_log_ranks_the_exact_checker_first_and_calls_it_blind_elsewhere():
    replay = load_replay()
    log = synthetic_log(prompts=48, seed=2)
    names = list(log["arithmetic"]["scores"])
    rewards = replay.consensus_on_whole_log(log)
    assert names[int(rewards["arithmetic"].argmax())] == "calc"
    assert float(rewards["word"][names.index("calc")]) == 0.5  # constant scores: blind
    assert abs(float(rewards["logic"][names.index("noise")]) - 0.5) < 0.1
    assert float(rewards["logic"][names.index("good")]) > float(rewards["logic"][names.index("likely")])


def test_replay_flags_are_checked(tmp_path):
    replay = load_replay()
    with pytest.raises(SystemExit):
        replay.main(["--feedback", "vibes"])
    with pytest.raises(SystemExit):
        replay.main(["--feedback", "verifier,vibes"])
    with pytest.raises(SystemExit):
        replay.main(["--settings", "nan,1"])
    with pytest.raises(SystemExit):
        replay.main(["--seeds", "0"])
