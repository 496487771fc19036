"""recipes/laser_grpo.sh and recipes/laser_ppo.sh: syntax, --dry-run, the CLI's checks, deepspeed's way in.

Nothing here starts Ray or touches a GPU: --dry-run prints the command, --laser.check_only runs every
check of the command line and exits.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from laser_rl.cli import train_ppo_ray as cli

ROOT = Path(__file__).resolve().parent.parent
RECIPES = [ROOT / "recipes" / "laser_grpo.sh", ROOT / "recipes" / "laser_ppo.sh"]
IDS = ["grpo", "ppo"]


def run(cmd: list[str], env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "CROSS_SIZE")}
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer, causal_lm, reward_model):
    """A tiny policy, two tiny RMs (a classifier and the policy as an implicit RM) and a prompt file."""
    root = tmp_path_factory.mktemp("recipes")
    for name, model in (("policy", causal_lm), ("rm", reward_model)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(4)))
    return {
        "POLICY": str(root / "policy"),
        "REWARD_MODELS": f"{root / 'rm'} implicit:{root / 'policy'}",
        "PROMPT_DATA": str(data),
        "SAVE_DIR": str(root / "run"),
    }


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_recipe_is_valid_bash(recipe):
    done = run(["bash", "-n", str(recipe)])
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_dry_run_prints_the_full_launch_and_starts_nothing(recipe, tmp_path):
    done = run(["bash", str(recipe), "--dry-run", "--laser.bandit", "thompson"], {"MODEL_ROOT": str(tmp_path / "models")})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    argv = shlex.split(lines[0])
    assert argv[:3] == ["python3", "-m", "laser_rl.cli.train_ppo_ray"]
    args = cli.build_parser().parse_args(argv[3:])  # every flag is one our CLI knows
    flat = vars(args)
    # The full GPU launch: 8 GPUs, vLLM engines, ZeRO-3, everything colocated (hybrid engine).
    assert flat["actor.num_gpus_per_node"] == 8 and flat["vllm.num_engines"] == 8 and flat["ds.zero_stage"] == 3
    assert flat["train.colocate_all"] and flat["vllm.enable_sleep"] and flat["ds.enable_sleep"]
    # Models as variables; default: a Llama-3-8B-Instruct policy and the paper's four RMs.
    assert flat["actor.model_name_or_path"] == str(tmp_path / "models" / "Meta-Llama-3-8B-Instruct")
    assert [Path(s).name for s in flat["laser.reward_models"]] == [
        "zephyr-7b-alpha", "Qwen1.5-7B-Chat", "Eurus-7b-kto", "OLMo-7B-Instruct-hf"
    ]
    assert flat["laser.bandit"] == "thompson"  # extra flags come last and win
    estimator = {"grpo": "group_norm", "ppo": "gae"}[recipe.stem.split("_")[1]]
    assert flat["algo.advantage.estimator"] == estimator
    assert not (tmp_path / "models").exists()


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_recipe_command_passes_every_check_with_real_models(recipe, tiny):
    """The recipe's whole flag set goes through OpenRLHF's checks and ours (models swapped for tiny ones)."""
    done = run(["bash", str(recipe), "--dry-run"], tiny)
    argv = shlex.split(done.stdout.strip())[3:]
    assert cli.main(argv + ["--laser.check_only"]) == 0
    assert not Path(tiny["SAVE_DIR"]).exists()


def test_recipe_with_missing_models_fails_before_ray(tmp_path, tiny):
    """`bash recipes/laser_grpo.sh` itself: models not downloaded -> one clear error, no Ray, no GPU."""
    env = {"MODEL_ROOT": str(tmp_path / "models"), "SAVE_DIR": str(tmp_path / "run"), "PYTHONWARNINGS": "ignore::FutureWarning"}
    # Nothing downloaded: the policy is named first. With the policy there, the first missing RM.
    for extra, missing in (({}, "Meta-Llama-3-8B-Instruct"), ({"POLICY": tiny["POLICY"]}, "zephyr-7b-alpha")):
        done = run(["bash", str(RECIPES[0]), "--laser.check_only"], {**env, **extra}, timeout=180)
        assert done.returncode == 2
        usage, error = done.stderr.strip().splitlines()  # the usage line and one error, no 180-line usage block
        assert usage.startswith("usage: python -m laser_rl.cli.train_ppo_ray")
        assert missing in error and "does not exist" in error
        assert "ray" not in done.stdout.lower()


def test_deepspeed_launch_runs_the_recipe_once(tmp_path):
    """`deepspeed recipes/laser_grpo.sh` spawns `python -u recipes/laser_grpo.sh --local_rank=R ...` per GPU."""
    launcher_env = {"WORLD_SIZE": "8", "CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MODEL_ROOT": str(tmp_path)}
    first = run([sys.executable, "-u", str(RECIPES[0]), "--local_rank=0", "--dry-run"], {**launcher_env, "LOCAL_RANK": "0"})
    assert first.returncode == 0, first.stderr
    note, command = first.stdout.strip().splitlines()
    assert "bash recipes/laser_grpo.sh" in note
    assert command.startswith("python3 -m laser_rl.cli.train_ppo_ray") and "--local_rank" not in command
    other = run([sys.executable, "-u", str(RECIPES[0]), "--local_rank=3", "--dry-run"], {**launcher_env, "LOCAL_RANK": "3"})
    assert other.returncode == 0 and other.stdout == "" and other.stderr == ""
    nodes = run([sys.executable, "-u", str(RECIPES[1]), "--local_rank=0"], {**launcher_env, "LOCAL_RANK": "0", "CROSS_SIZE": "2"})
    assert nodes.returncode == 1
    assert nodes.stderr.strip().count("\n") == 0 and "bash recipes/laser_ppo.sh" in nodes.stderr


@pytest.mark.parametrize("recipe", RECIPES, ids=IDS)
def test_python_sees_the_bash_part_as_a_string(recipe):
    """The polyglot stays clean: Python compiles the file without a warning (no stray escapes)."""
    done = run([sys.executable, "-W", "error", "-c", f"compile(open({str(recipe)!r}).read(), 'recipe', 'exec')"])
    assert done.returncode == 0, done.stderr
