"""benchmarks/demo_seeds.py end to end in a shortened form: the tiny local policy stands in for SmolLM2, real
reasoning-gym prompts and verifiers, 2 seeds x 2 steps, a tiny held-out set; then a resume from its JSON files."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="pip install reasoning-gym")

CHAT = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %} A:{% endif %}"


def _load_study():
    spec = importlib.util.spec_from_file_location(
        "demo_seeds", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "demo_seeds.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tiny_assets(monkeypatch, tokenizer, causal_lm):
    """DemoAssets load the tiny Llama (with a one-line chat template) instead of the packaged SmolLM2."""
    from laser_rl.demo import assets

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHAT
    monkeypatch.setattr(assets, "load_policy", lambda verbose=True: (copy.deepcopy(causal_lm), tok))


def tiny_config(**sizes):
    """A DemoConfig small enough to train in seconds on the tiny assets."""
    from laser_rl.demo.grpo import GRPOConfig
    from laser_rl.demo.run import DemoConfig

    return DemoConfig(
        prompts_per_domain=1, samples=2, max_new_tokens=4, arms=("verbose", "smollm2", "noise"), probe_prompts=2,
        probe_min_mixed=1, train_layers=1, grpo=GRPOConfig(lr=1e-3), threads=1, **sizes,
    )


def test_study_runs_end_to_end_and_resumes(tmp_path, tiny_assets):
    study = _load_study()
    base = tiny_config(steps=2, train_per_domain=4, eval_per_domain=3)
    methods = ["laser-verifier", "laser-consensus", "mean", "random", "single"]
    results = str(tmp_path / "runs")
    made = study.run_study(base, ["hard"], [0, 1], methods, results, progress=False)
    assert made == 10
    files = sorted(os.listdir(results))
    assert files == sorted(f"hard__{m}__seed{s}.json" for m in methods for s in (0, 1))
    record = json.loads((tmp_path / "runs" / "hard__laser-verifier__seed0.json").read_text())
    result = record["result"]
    assert set(result["eval_correct"]) == {"arithmetic", "word", "logic"}
    assert all(len(v) == 3 and set(v) <= {0, 1} for v in result["eval_correct"].values())
    assert result["feedback"] == "verifier" and result["rm_passes"] == 2 * 3 * 2  # steps x prompts x samples, one RM each
    mean = json.loads((tmp_path / "runs" / "hard__mean__seed0.json").read_text())["result"]
    assert mean["rm_passes"] == 3 * result["rm_passes"]  # the ensemble pays all K = 3 RMs (the demo charges noise too)
    # Resume: every JSON exists, nothing runs again and the files are untouched.
    stamps = {f: os.path.getmtime(os.path.join(results, f)) for f in files}
    assert study.run_study(base, ["hard"], [0, 1], methods, results, progress=False) == 0
    assert {f: os.path.getmtime(os.path.join(results, f)) for f in files} == stamps
    # A lost run is redone alone.
    os.remove(os.path.join(results, "hard__random__seed1.json"))
    assert study.run_study(base, ["hard"], [0, 1], methods, results, progress=False) == 1

    out = str(tmp_path / "report" / "demo_seeds")
    agg = study.write_report(results, out)
    pool = agg["hard"]
    assert pool["seeds"] == [0, 1] and pool["prompts_per_domain"] == 3
    rows = {r["method"]: r for r in pool["methods"]}
    assert list(rows) == methods
    for r in rows.values():
        m, lo, hi = r["accuracy"]["mean"]
        assert lo <= m + 1e-9 and m <= hi + 1e-9
    assert set(rows["mean"]["diff_vs"]) == {"laser-verifier", "laser-consensus"} and set(rows["laser-verifier"]["diff_vs"]) == {"laser-consensus"}
    # The consensus runs record RewardSelector's default schedule, and the row says it.
    assert rows["laser-consensus"]["audit"] == {"fraction": 0.03, "warmup_steps": 8, "warmup_fraction": 0.4}
    assert rows["laser-consensus"]["label"].endswith("(label-free; audits 40% x 8 steps, then 3%)") and rows["mean"]["audit"] == {}
    assert rows["mean"]["rm_passes_vs_ensemble"] == 1.0
    for ext in (".md", ".json", ".png"):
        assert os.path.getsize(out + ext) > 100
    assert "Δ vs LASeR" in open(out + ".md").read()
    # Runs of one method made under different audit schedules are not pooled into one row.
    path = os.path.join(results, "hard__laser-consensus__seed1.json")
    stale = json.loads(open(path).read())
    stale["result"]["audit"] = {"fraction": 0.1, "warmup_steps": 0, "warmup_fraction": 0.4}
    with open(path, "w") as f:
        json.dump(stale, f)
    with pytest.raises(ValueError, match="different audit schedules"):
        study.write_report(results, out)


def test_a_run_is_claimed_once_and_a_dead_holders_claim_is_taken_over(tmp_path):
    study = _load_study()
    path = str(tmp_path / "hard__random__seed0.json")
    assert study.claim(path) and open(path + ".claim").read() == str(os.getpid())
    assert study.claim(path)  # the holder itself may go on
    with open(path + ".claim", "w") as f:
        f.write(str(os.getppid()))  # a live process holds it
    assert not study.claim(path)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open(path + ".claim", "w") as f:
        f.write(finished.stdout.strip())  # its holder has exited (killed mid-run)
    assert study.claim(path) and open(path + ".claim").read() == str(os.getpid())


def test_study_skips_a_run_another_process_holds(tmp_path, tiny_assets):
    study = _load_study()
    base = tiny_config(steps=1, train_per_domain=2, eval_per_domain=2)
    results = tmp_path / "runs"
    results.mkdir()
    (results / "hard__random__seed0.json.claim").write_text(str(os.getppid()))
    assert study.run_study(base, ["hard"], [0], ["random", "single"], str(results), progress=False) == 1
    assert sorted(os.listdir(results)) == ["hard__random__seed0.json.claim", "hard__single__seed0.json"]


def test_paired_bootstrap_sees_a_consistent_gap_and_not_a_null_one():
    study = _load_study()
    rng = np.random.default_rng(0)
    base = (rng.random((3, 3, 64)) < 0.5).astype(float)  # seeds x domains x prompts
    better = base.copy()
    flip = (base == 0) & (rng.random(base.shape) < 0.3)  # right on ~15% more prompts, never wrong where base is right
    better[flip] = 1.0
    boot = study.bootstrap(np.stack([base, better, base]), reps=2000)
    gap = boot[:, 1, -1] - boot[:, 0, -1]
    assert np.percentile(gap, 2.5) > 0  # paired: a consistent gain shows
    same = boot[:, 2, -1] - boot[:, 0, -1]
    assert np.all(same == 0)  # identical methods differ by exactly 0 in every replicate (same resampling)
    assert math.isclose(float(boot[:, 0, -1].mean()), float(base.mean()), abs_tol=0.02)


def test_cli_rejects_a_first_seed_outside_the_seed_range(capsys):
    study = _load_study()
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--seeds", "2", "--first-seed", "2"])
    assert exit_info.value.code == 2
    assert "--first-seed must be in 0..1" in capsys.readouterr().err
