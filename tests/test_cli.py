"""The `laser-rl` command: config dataclasses as flags, one-line errors naming the flag, lazy subcommands."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from laser_rl.cli import common, main

# ----- config dataclasses as flags ------------------------------------------------------------------


@dataclasses.dataclass
class ToyConfig:
    n_samples: int = 4  # responses per prompt
    # a comment block above a field
    # becomes its help when the line has none
    rate: float = 0.5
    names: tuple[str, ...] = ("a", "b")
    limit: int | None = None  # None: no limit
    verbose: bool = False  # print more
    seed: int = 0

    def __post_init__(self):
        if self.n_samples < 2:
            raise ValueError(f"n_samples must be >= 2, got {self.n_samples}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"unknown limit {self.limit}")


def _toy_parser(**kw) -> common.Parser:
    p = common.Parser(prog="toy")
    common.add_config_flags(p, ToyConfig, **kw)
    p.set_defaults(parser=p)
    return p


def test_config_flags_take_defaults_types_and_help_from_the_dataclass():
    p = _toy_parser(flags={"n_samples": "--n"}, skip=("seed",))
    args = p.parse_args(["--n", "3", "--names", "x, y,z", "--limit", "7", "--verbose", "--rate", "0.25"])
    config = common.config_from_args(p, ToyConfig, args)
    assert config == ToyConfig(n_samples=3, rate=0.25, names=("x", "y", "z"), limit=7, verbose=True, seed=0)
    assert common.config_from_args(p, ToyConfig, p.parse_args([])) == ToyConfig()
    text = p.format_help()
    assert "responses per prompt (default: 4)" in text and "--n N" in text
    assert "a comment block above a field becomes its help" in " ".join(text.split())
    assert "--no-verbose" in text and "--seed" not in text


def test_post_init_error_is_one_line_naming_the_flag(capsys):
    p = _toy_parser(flags={"n_samples": "--n"})
    with pytest.raises(SystemExit) as e:
        common.config_from_args(p, ToyConfig, p.parse_args(["--n", "1"]))
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 2 and err[0].startswith("usage: toy")
    assert err[1] == "toy: error: --n must be >= 2, got 1"
    with pytest.raises(SystemExit):
        common.config_from_args(p, ToyConfig, p.parse_args(["--limit", "0"]))
    assert capsys.readouterr().err.splitlines()[1] == "toy: error: unknown --limit 0"


# ----- laser-rl example -------------------------------------------------------------------------------


def _variant_dirs(out):
    return sorted(d for d in os.listdir(out) if (out / d).is_dir())


def test_example_learns_and_writes_plot_and_tensorboard(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["example", "--steps", "40", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if line.startswith("domain") and line.split()[0] != "domain"]
    assert len(rows) == 3
    for k, row in enumerate(rows):  # arm k is best on domain k
        fractions = [float(x) for x in row[1:]]
        assert max(range(4), key=fractions.__getitem__) == k and fractions[3] < 0.1
    (variant,) = _variant_dirs(out)
    assert variant.startswith("linucb-prompt") and "seed0" in variant
    assert (out / variant / "arm_choice_by_domain.png").stat().st_size > 10_000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / variant / "tensorboard"))


def test_example_variants_write_separate_folders_titled_by_their_settings(tmp_path, monkeypatch):
    from laser_rl.cli import example

    titles = []
    monkeypatch.setattr(example, "plot_arm_choice", lambda history, names, path, title: titles.append(title))
    out = tmp_path / "runs"
    main(["example", "--steps", "3", "--output-dir", str(out)])
    main(["example", "--steps", "3", "--output-dir", str(out), "--bandit", "thompson", "--alpha", "0.5"])
    main(["example", "--steps", "3", "--output-dir", str(out), "--baseline", "random"])
    main(["example", "--steps", "3", "--output-dir", str(out), "--granularity", "batch"])
    assert len(_variant_dirs(out)) == 4
    assert "linucb" in titles[0] and "thompson (alpha 0.5)" in titles[1] and "baseline random" in titles[2]
    assert "one RM per batch" in titles[3] and all("3 steps x 32 prompts" in t for t in titles)


def test_example_tensorboard_holds_selector_curves(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    main(["example", "--steps", "5", "--output-dir", str(out)])
    acc = EventAccumulator(str(out / _variant_dirs(out)[0] / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "laser/arm_entropy" in tags and "laser/domain/domain0/arm_frac/rm_noise" in tags
    assert len(acc.Scalars("laser/cumulative_regret")) == 5


def _one_error_line(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 2 and err[0].startswith("usage: laser-rl"), err
    return err[1]


def test_example_rejects_bad_flags(capsys, tmp_path):
    assert "--steps" in _one_error_line(capsys, "example", "--steps", "0")
    assert "--bandit" in _one_error_line(capsys, "example", "--bandit", "greedy")
    # The selector's own check (Thompson's v >= 0), before anything is written.
    line = _one_error_line(capsys, "example", "--bandit", "thompson", "--alpha", "-1", "--output-dir", str(tmp_path / "x"))
    assert "--alpha -1.0" in line and "Thompson v" in line and not (tmp_path / "x").exists()


def test_missing_optional_package_is_one_line_with_the_install_command(capsys, monkeypatch):
    real = common.find_spec
    hidden = {"tensorboard", "openrlhf"}
    monkeypatch.setattr(common, "find_spec", lambda name: None if name in hidden else real(name))
    line = _one_error_line(capsys, "example", "--steps", "2")
    assert "'tensorboard'" in line and "pip install tensorboard" in line
    line = _one_error_line(capsys, "demo", "--steps", "1")
    assert "'openrlhf'" in line and "pip install --no-deps openrlhf==0.11.2" in line and "flash-attn" in line


def test_demo_flags_are_demo_config_fields(capsys):
    assert "--steps must be >= 1" in _one_error_line(capsys, "demo", "--steps", "0")
    assert "--samples must be >= 2" in _one_error_line(capsys, "demo", "--samples", "1")
    assert "--arms takes 2 or more" in _one_error_line(capsys, "demo", "--arms", "calculator,bogus")
    assert "--eval-prompts must be >= 1" in _one_error_line(capsys, "demo", "--eval-prompts", "0")
    assert "--methods" in _one_error_line(capsys, "demo", "--methods", "laser,best")
    assert "--feedback progress: the signal needs" in _one_error_line(capsys, "demo", "--feedback", "progress")


# ----- one error style for paths and reward-model specs ------------------------------------------------


@pytest.fixture
def data_files(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": "5"}) + "\n")
    responses = tmp_path / "responses.jsonl"
    responses.write_text(json.dumps({"prompt": "What is 2 + 3?", "responses": ["5", "7", "it is 5"]}) + "\n")
    return str(prompts), str(responses), str(tmp_path / "missing.jsonl"), str(tmp_path / "no_model_dir")


@pytest.mark.parametrize("command", ["iterative-dpo", "best-of-n"])
def test_training_modes_name_the_flag_of_a_missing_path_or_bad_spec(command, data_files, capsys):
    prompts, _, missing, no_dir = data_files
    base = [command, "--device", "cpu"]
    line = _one_error_line(capsys, *base, "--policy", no_dir, "--reward-models", "noise", "noise:2", "--data", missing)
    assert line.endswith(f"error: --data: file {missing!r} does not exist")
    line = _one_error_line(capsys, *base, "--policy", no_dir, "--reward-models", "noise", "noise:2", "--data", prompts)
    assert "error: --policy:" in line and "does not exist" in line
    line = _one_error_line(capsys, *base, "--policy", no_dir, "--reward-models", "noise", no_dir, "--data", prompts)
    assert f"error: --reward-models {no_dir}:" in line
    line = _one_error_line(capsys, *base, "--policy", no_dir, "--reward-models", "noise", "nosuchmodule:fn", "--data", prompts)
    assert "error: --reward-models nosuchmodule:fn:" in line
    line = _one_error_line(capsys, *base, "--policy", no_dir, "--reward-models", "noise", "noise:2", "--data", prompts,
                           "--warm-start", missing)
    assert "--warm-start" in line and "does not exist" in line
    # A bad bandit setting fails before any model loads (--policy does not exist and is not reached).
    line = _one_error_line(capsys, *base, "--policy", no_dir, "--reward-models", "noise", "noise:2", "--data", prompts,
                           "--bandit", "exp3", "--alpha", "2")
    assert "--alpha 2.0" in line and "Exp3 gamma" in line


def test_agreement_names_the_flag_of_a_missing_path_or_bad_spec(data_files, capsys):
    _, responses, missing, no_dir = data_files
    line = _one_error_line(capsys, "agreement", "--reward-models", "noise", "noise:2", "--data", missing)
    assert line.endswith(f"error: --data: file {missing!r} does not exist")
    line = _one_error_line(capsys, "agreement", "--reward-models", "noise", no_dir, "--data", responses)
    assert f"error: --reward-models {no_dir}:" in line
    line = _one_error_line(capsys, "agreement", "--reward-models", "noise", "noise:x", "--data", responses)
    assert "error: --reward-models noise:x:" in line


def test_module_function_spec_resolves_from_the_current_directory(tmp_path, data_files, monkeypatch, capsys):
    _, responses, _, _ = data_files
    (tmp_path / "my_cli_rewards.py").write_text("def length(prompts, responses, labels):\n    return [float(len(r)) for r in responses]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_cli_rewards", raising=False)
    out = tmp_path / "agree"
    assert main(["agreement", "--reward-models", "my_cli_rewards:length", "noise", "--data", responses,
                 "--output-dir", str(out), "--device", "cpu"]) == 0
    assert (out / "agreement.json").exists()


# ----- start-up ------------------------------------------------------------------------------------------


def test_help_needs_no_optional_package_and_imports_no_model_code():
    # Optional packages made unimportable (None in sys.modules): --help must not need them.
    code = (
        "import sys\n"
        "for m in ('tqdm', 'tensorboard', 'matplotlib', 'transformers', 'datasets', 'openrlhf'): sys.modules[m] = None\n"
        "from laser_rl.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "assert 'torch' not in sys.modules, 'laser-rl --help imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "example" in done.stdout and "iterative-dpo" in done.stdout and "demo" in done.stdout
    assert done.stderr == ""


def test_subcommand_help_has_a_description_and_no_internal_notes(capsys):
    for command in ("example", "iterative-dpo"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert "shared" not in text.lower() and "also holds" not in text.lower()
        assert "--seed" in text and "(default" in text


def test_demo_without_openrlhf_says_what_to_install_in_one_line():
    code = "import sys\nsys.modules['openrlhf'] = None\nfrom laser_rl.cli import main\nmain(['demo', '--steps', '1'])\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 2, done.stderr
    assert lines[1].startswith("laser-rl demo: error: laser-rl demo needs the Python package 'openrlhf'")
    assert "pip install --no-deps openrlhf==0.11.2" in lines[1] and "install_cpu.sh" in lines[1]  # from a clone
