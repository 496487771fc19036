"""laser_rl.integrations.openrlhf.launch without Ray: the AST reader of OpenRLHF's command line, the
forked train() against upstream's (installed openrlhf source), and the package's import boundary.

Nothing here starts Ray, imports vLLM or loads a model.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from laser_rl.integrations.openrlhf import launch

ROOT = Path(__file__).resolve().parent.parent

# Calls only the fork makes: the CPU shim, the lazy LASeR classes, LASeR's need for the reference model,
# and which reward-model specs need the reward group.
FORK_ONLY_CALLS = {"ensure_openrlhf_importable", "openrlhf_classes", "needs_reference", "spec_kind"}
# Calls the fork makes under another name: every RayActorGroup through one helper, LASeR's trainer.
FORK_RENAMED_CALLS = {"group": "RayActorGroup", "c.LaserPPOTrainer.remote": "PPOTrainer.remote"}
# Flags upstream's train() reads that the fork never needs: the CLI rejects them (see check_args).
FORK_REJECTED_FLAGS = {"args.reward.model_name_or_path", "args.train.async_enable"}


def _upstream_train() -> ast.FunctionDef:
    _, tree = launch.openrlhf_source()
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")


def _fork_train() -> ast.FunctionDef:
    return ast.parse(textwrap.dedent(inspect.getsource(launch.train))).body[0]


def call_skeleton(fn: ast.FunctionDef) -> list[str]:
    """Every call the function makes, in evaluation order (arguments before the call), nested defs skipped."""
    calls = []

    class Visitor(ast.NodeVisitor):
        def visit_Call(self, node):
            self.generic_visit(node)
            calls.append(ast.unparse(node.func))

        def visit_FunctionDef(self, node):
            if node is fn:
                self.generic_visit(node)

    Visitor().visit(fn)
    return calls


def flags_read(fn: ast.FunctionDef) -> set[str]:
    """The `args.<group>.<flag>` attributes the function reads."""
    names = {ast.unparse(n) for n in ast.walk(fn) if isinstance(n, ast.Attribute)}
    return {n for n in names if n.startswith("args.") and n.count(".") == 2}


def keywords_of(fn: ast.FunctionDef, callee: str) -> tuple[int, set[str]]:
    """(number of positional arguments, keyword names) of the one call to `callee` in fn."""
    (call,) = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and ast.unparse(n.func) == callee]
    return len(call.args), {k.arg for k in call.keywords}


def ray_env_vars(fn: ast.FunctionDef) -> set[str]:
    (call,) = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and ast.unparse(n.func) == "ray.init"]
    (runtime_env,) = [k.value for k in call.keywords if k.arg == "runtime_env"]
    env = next(v for k, v in zip(runtime_env.keys, runtime_env.values) if ast.literal_eval(k) == "env_vars")
    return {ast.literal_eval(k) for k in env.keys}


# ----- the forked train() against the installed OpenRLHF -----------------------------------------
def test_forked_train_has_upstreams_call_skeleton():
    """Upstream adding, dropping or reordering a step of train() fails here, naming the difference."""
    upstream, fork = _upstream_train(), _fork_train()
    ours = [FORK_RENAMED_CALLS.get(c, c) for c in call_skeleton(fork) if c not in FORK_ONLY_CALLS]
    assert ours == call_skeleton(upstream)


def test_forked_train_reads_every_flag_and_passes_every_argument_upstream_does():
    upstream, fork = _upstream_train(), _fork_train()
    assert FORK_REJECTED_FLAGS <= flags_read(upstream)
    assert flags_read(upstream) - FORK_REJECTED_FLAGS <= flags_read(fork), "upstream train() reads a flag the fork ignores"
    assert keywords_of(fork, "create_vllm_engines") == keywords_of(upstream, "create_vllm_engines")
    positional, keywords = keywords_of(fork, "c.LaserPPOTrainer.remote")
    assert (positional, keywords - {"laser_reward_group"}) == keywords_of(upstream, "PPOTrainer.remote")
    assert ray_env_vars(fork) == ray_env_vars(upstream)


def test_skeleton_comparison_notices_a_drifted_upstream():
    """The comparison is not vacuous: one extra upstream step, or one missing argument, is seen."""
    upstream = _upstream_train()
    drifted = ast.parse(ast.unparse(upstream)).body[0]
    drifted.body.insert(3, ast.parse("ray.get(strategy.setup_new_feature(args.train.new_flag))").body[0])
    assert call_skeleton(drifted) != call_skeleton(upstream)
    assert "args.train.new_flag" in flags_read(drifted) - flags_read(_fork_train())


# ----- the AST reader ------------------------------------------------------------------------------
@pytest.fixture
def fresh_reader():
    """Empty the reader's caches before and after (a test may have read a fake source)."""
    launch.openrlhf_source.cache_clear()
    launch._openrlhf_main_block.cache_clear()
    yield
    launch.openrlhf_source.cache_clear()
    launch._openrlhf_main_block.cache_clear()


def test_reader_parses_openrlhfs_source_once(fresh_reader, monkeypatch):
    parses = []
    real_parse = ast.parse
    monkeypatch.setattr(launch.ast, "parse", lambda *a, **k: parses.append(a[1:]) or real_parse(*a, **k))
    first, second = launch.openrlhf_parser(), launch.openrlhf_parser()
    assert first is not second  # a fresh parser each time: callers change prog / usage
    assert len(parses) == 1 and parses[0][0].endswith(os.path.join("openrlhf", "cli", "train_ppo_ray.py"))
    flags = {s for a in first._actions for s in a.option_strings}
    assert len(flags) > 150 and "--actor.model_name_or_path" in flags


def _fake_openrlhf(monkeypatch, tmp_path, main_block: str) -> str:
    path = tmp_path / "train_ppo_ray.py"
    path.write_text("def train(args):\n    pass\n\n\nif __name__ == '__main__':\n" + textwrap.indent(main_block, "    "))
    monkeypatch.setattr(launch, "openrlhf_source", lambda: (str(path), ast.parse(path.read_text(), str(path))))
    return str(path)


FAKE_PARSER = """parser = argparse.ArgumentParser()
parser.add_argument("--x", type=int, default=1)
args = parser.parse_args()
args = hierarchize(args)
{checks}
train(args)
"""


def test_reader_names_a_name_openrlhfs_block_reads_but_laser_rl_does_not_provide(fresh_reader, monkeypatch, tmp_path):
    block = FAKE_PARSER.replace('default=1)', 'default=json.loads("1"))').format(checks="pass")
    path = _fake_openrlhf(monkeypatch, tmp_path, block)
    with pytest.raises(RuntimeError, match=r"argument parser in .* reads \['json'\]") as info:
        launch.openrlhf_parser()
    assert path in str(info.value) and "0.11.x" in str(info.value)
    # Names the block defines itself (an import, a lambda's argument) are not missing.
    block = FAKE_PARSER.format(checks="import math\nargs.y = (lambda v: math.sqrt(v))(4)")
    _fake_openrlhf(monkeypatch, tmp_path, block)
    launch._openrlhf_main_block.cache_clear()
    assert launch.openrlhf_parser().parse_args([]).x == 1
    args = type("Args", (), {})()
    launch.openrlhf_check_args(args)
    assert args.y == 2.0
    # A check that reads a name nobody gives: the error comes before any check has run.
    block = FAKE_PARSER.format(checks="args.y = 1\nwarnings.warn('x')")
    _fake_openrlhf(monkeypatch, tmp_path, block)
    launch._openrlhf_main_block.cache_clear()
    args = type("Args", (), {})()
    with pytest.raises(RuntimeError, match=r"argument checks in .* reads \['warnings'\]"):
        launch.openrlhf_check_args(args)
    assert not hasattr(args, "y")


def test_reader_names_the_statement_it_cannot_find(fresh_reader, monkeypatch, tmp_path):
    _fake_openrlhf(monkeypatch, tmp_path, FAKE_PARSER.format(checks="pass").replace("train(args)", "run(args)"))
    with pytest.raises(RuntimeError, match=r"cannot find \['train\(args\)'\] in the __main__ block"):
        launch.openrlhf_parser()
    path = tmp_path / "no_main.py"
    path.write_text("def train(args):\n    pass\n")
    monkeypatch.setattr(launch, "openrlhf_source", lambda: (str(path), ast.parse(path.read_text())))
    launch._openrlhf_main_block.cache_clear()
    with pytest.raises(RuntimeError, match="no `if __name__"):
        launch.openrlhf_parser()


# ----- the package boundary --------------------------------------------------------------------------
def test_help_without_openrlhf_is_one_line_naming_the_package_and_the_install():
    """OpenRLHF made unimportable at the import boundary (sys.modules entry None): no traceback."""
    code = (
        "import sys, runpy; sys.modules['openrlhf'] = None; sys.argv = ['train_ppo_ray', '--help']; "
        "runpy.run_module('laser_rl.cli.train_ppo_ray', run_name='__main__')"
    )
    # pynvml's FutureWarning at `import torch` is third-party start-up noise, not this error.
    done = subprocess.run(
        [sys.executable, "-W", "ignore::FutureWarning", "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("python -m laser_rl.cli.train_ppo_ray: error: OpenRLHF is not installed")
    assert 'pip install ".[openrlhf]"' in lines[0] and "scripts/install_cpu.sh" in lines[0]


def test_one_home_per_concern():
    assert importlib.util.find_spec("laser_rl.openrlhf_integration") is None  # no second home left behind
    assert launch.WORKER_SETUP_HOOK.rpartition(".")[0] == "laser_rl.integrations.openrlhf.compat"
    module, _, name = launch.WORKER_SETUP_HOOK.rpartition(".")
    assert callable(getattr(importlib.import_module(module), name))
    # The rollout logic imports no Ray and no OpenRLHF: it runs on plain tensors.
    rollout_source = (ROOT / "laser_rl" / "integrations" / "openrlhf" / "rollout.py").read_text()
    imported = {
        (n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
        for n in ast.walk(ast.parse(rollout_source)) if isinstance(n, (ast.Import, ast.ImportFrom))
        for a in n.names
    }
    assert not imported & {"ray", "openrlhf", "vllm", "deepspeed"}
