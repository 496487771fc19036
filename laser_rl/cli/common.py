"""What every `laser-rl` subcommand shares: the parser, config dataclasses as flags, one error style, loaders.

A config dataclass IS its subcommand's command line: `add_config_flags` makes one flag per field (default from the
dataclass, help from the field's comment) and `config_from_args` builds the dataclass, whose `__post_init__` is the
only validation. Every error a user can cause (a bad value, a missing path, a bad reward-model spec, a missing
optional package) ends as `parser.error`: one usage line and one error line naming the flag or package and the fix.

This module imports only the standard library at import time, so `laser-rl --help` works with the core deps alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import inspect
import os
import re
import sys
import typing
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# --------------------------------------------------------------------------------------------------
# Parser and errors
# --------------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse with short errors: one usage line (not the wrapped list of every flag) and one error line."""

    def error(self, message: str) -> typing.NoReturn:
        one_line = " ".join(str(message).split())
        self.exit(2, f"usage: {self.prog} [options]   (all flags: {self.prog} --help)\n{self.prog}: error: {one_line}\n")


# A missing optional import -> (the PyPI package, the command that installs it). Commands work from a wheel:
# none points to a file of the repository.
OPENRLHF = (
    "on a GPU machine pip install 'openrlhf[vllm]==0.11.2'; on a CPU-only one pip install --no-deps openrlhf==0.11.2, "
    "its other requirements (laser-rl's requirements/openrlhf-cpu.txt; from a clone, bash scripts/install_cpu.sh does "
    "it all) and flash-attn's Python-only build: FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE "
    "pip install --no-build-isolation flash-attn==2.8.3"
)
INSTALL = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "tqdm": ("tqdm", "pip install tqdm"),
    "matplotlib": ("matplotlib", "pip install matplotlib"),
    "datasets": ("datasets", "pip install datasets"),
    "transformers": ("transformers", "pip install transformers"),
    "peft": ("peft", "pip install peft"),
    "openrlhf": ("openrlhf", OPENRLHF),
    "flash_attn": ("flash-attn", OPENRLHF),
    "reasoning_gym": ("reasoning-gym", "pip install 'reasoning-gym>=0.1.20'"),
    "gguf": ("gguf", "pip install 'gguf>=0.10'"),
}


def missing_package_message(module: str, why: str) -> str:
    """'<why> needs the package X: <install command>' for an import name (`flash_attn`, `reasoning_gym`, ...)."""
    top = module.split(".")[0]
    package, command = INSTALL.get(top, (top.replace("_", "-"), f"pip install {top.replace('_', '-')}"))
    return f"{why} needs the Python package {package!r}, which is not installed: {command}"


def require(parser: argparse.ArgumentParser, modules: typing.Sequence[str], why: str) -> None:
    """parser.error naming the first of `modules` that is not importable (checked without importing it)."""
    for module in modules:
        if find_spec(module) is None:
            parser.error(missing_package_message(module, why))


def find_spec(module: str):
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return None


@contextmanager
def flag_errors(parser: argparse.ArgumentParser, flag: str) -> Iterator[None]:
    """Turn what a user's value for `flag` can raise (a bad spec, a missing path) into one line naming the flag."""
    try:
        yield
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in INSTALL:
            parser.error(missing_package_message(e.name, flag))
        parser.error(f"{flag}: {e}")
    except (ValueError, OSError, ImportError) as e:
        parser.error(f"{flag}: {e}")


def check_file(parser: argparse.ArgumentParser, flag: str, path: str | None) -> None:
    if path is not None and not os.path.isfile(path):
        parser.error(f"{flag}: file {path!r} does not exist")


# --------------------------------------------------------------------------------------------------
# Config dataclasses as flags
# --------------------------------------------------------------------------------------------------


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class source: its trailing `# ...`, else the comment block right above it."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # no source (frozen app): flags still work, without help
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    comments: dict[str, str] = {}
    block: list[str] = []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"(\w+)\s*:[^#]*?(?:#\s*(.*))?$", stripped)
        if match and match.group(1) in names:
            comments[match.group(1)] = match.group(2) or " ".join(block)
        block = []
    return comments


def _flag(name: str, flags: dict[str, str]) -> str:
    return flags.get(name, "--" + name.replace("_", "-"))


def _comma_tuple(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    flags: dict[str, str] | None = None,
    skip: typing.Collection[str] = (),
    help: dict[str, str] | None = None,
) -> None:
    """One flag per field of the dataclass `cls` (nested dataclasses and `skip` excepted).

    flags: field -> flag name where it differs from --field-name; help: field -> help where the comment is not enough.
    Bools become --x / --no-x; `tuple[str, ...]` takes comma-separated values; `X | None` takes an X.
    """
    flags, help = dict(flags or {}), dict(help or {})
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    registered = getattr(parser, "config_flags", {})
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if f.name in skip or (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict = {"dest": f.name, "default": default}
        base = [a for a in typing.get_args(kind) if a is not type(None)] if type(None) in typing.get_args(kind) else [kind]
        base_type = base[0] if len(base) == 1 else str
        if base_type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base_type) is tuple:
            kwargs.update(type=_comma_tuple, metavar="A,B,...")
            if isinstance(default, tuple):
                kwargs["default"] = default
        else:
            kwargs["type"] = base_type if base_type in (int, float, str) else str
        text = help.get(f.name) or comments.get(f.name, "")
        shown = ",".join(default) if isinstance(default, tuple) else default
        kwargs["help"] = (text + " " if text else "") + f"(default: {shown})".replace("%", "%%")
        flag = _flag(f.name, flags)
        if base_type is not bool:
            kwargs.setdefault("metavar", flag.lstrip("-").upper().replace("-", "_"))
        parser.add_argument(flag, **kwargs)
        registered[f.name] = flag
    parser.config_flags = registered  # type: ignore[attr-defined]


def config_from_args(parser: argparse.ArgumentParser, cls: type, args: argparse.Namespace, **overrides):
    """Build `cls` from the parsed flags (plus `overrides`); its __post_init__'s ValueError becomes parser.error."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    values.update(overrides)
    try:
        return cls(**values)
    except ValueError as e:
        parser.error(flag_message(str(e), getattr(parser, "config_flags", {})))


def flag_message(message: str, flags: dict[str, str]) -> str:
    """Name flags, not fields, in a config's error: 'n_samples must be >= 2' -> '--n must be >= 2'.

    A field name with an underscore is replaced wherever it stands as a word; a plain word (n, lr, arms, ...) only
    where it reads as a name: at the start, after 'unknown', or before must/and/a comparison/'='/','.
    """
    for name in sorted(flags, key=len, reverse=True):
        word = rf"(?<![\w.-]){re.escape(name)}(?![\w-])"
        if "_" in name:
            message = re.sub(word, flags[name], message)
            continue
        message = re.sub(rf"^{re.escape(name)}(?![\w-])", flags[name], message)
        message = re.sub(rf"(?<=unknown ){re.escape(name)}(?![\w-])", flags[name], message)
        message = re.sub(rf"{word}(?=\s+must\b|\s+and\b|\s*[=<>,])", flags[name], message)
    return message


# --------------------------------------------------------------------------------------------------
# Models, reward models and selectors (torch is imported inside: not needed for --help)
# --------------------------------------------------------------------------------------------------

RM_SPECS = (
    "reward models (laser_rl.arms.make_arm specs): a local RM directory, implicit:<dir>, module:function "
    "(found from the current directory), http(s)://url (OpenRLHF serve_rm) or noise[:sigma]"
)


def add_model_flags(p: argparse.ArgumentParser, policy_required: bool = True) -> None:
    p.add_argument("--policy", required=policy_required,
                   help="local HF causal-LM directory; 'smollm2' loads the demo's packaged SmolLM2-135M (needs the demo extra)")
    p.add_argument("--reward-models", nargs="+", required=True, metavar="SPEC", help=RM_SPECS)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=0)


def add_selector_flags(p: argparse.ArgumentParser) -> None:
    """The bandit's flags; their names are RewardSelector's keywords, so selector_from_flags reads them as they are."""
    from laser_rl.bandits import BANDITS

    p.add_argument("--bandit", choices=sorted(BANDITS), default="linucb")
    p.add_argument("--alpha", type=float, default=None,
                   help="exploration knob of the chosen bandit: LinUCB alpha, Thompson v, epsilon-greedy epsilon, "
                        "Exp3 gamma, UCB1 c (default: the bandit's own; LinUCB 0.1 as the paper)")
    p.add_argument("--discount", type=float, default=1.0, help="< 1 forgets old bandit statistics (drifting rewards)")
    p.add_argument("--granularity", choices=("prompt", "batch"), default="prompt",
                   help="one RM per prompt (default) or per batch (the paper's code)")
    p.add_argument("--proj-dim", type=int, default=128,
                   help="random projection of the policy's hidden state for the bandit context (0: none)")
    p.add_argument("--warm-start", default=None, metavar="JSONL",
                   help="labeled preference set (prompt, chosen, rejected, optional domain) to initialize the bandit")
    p.add_argument("--warm-start-weight", type=float, default=1.0)


def check_selector_flags(args: argparse.Namespace, *overrides: dict) -> None:
    """The selector flags' checks before any model loads: the selector is built once on noise stand-ins per
    override set (best-of-n: one per strategy)."""
    parser = args.parser
    if args.proj_dim < 0:
        parser.error("--proj-dim must be >= 0")
    if not 0 < args.discount <= 1:
        parser.error("--discount must lie in (0, 1]")
    if args.warm_start_weight <= 0:
        parser.error("--warm-start-weight must be > 0")
    check_file(parser, "--warm-start", args.warm_start)
    stand_ins = ["noise"] * len(args.reward_models)
    for extra in overrides or ({},):
        make_selector(args, stand_ins, 8, **extra)


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_policy(args: argparse.Namespace, path: str, flag: str = "--policy"):
    """(model, tokenizer) on the run's device and dtype; 'smollm2' is the demo's packaged model. Errors name `flag`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(args.device)
    with flag_errors(args.parser, flag):
        if path == "smollm2":
            from laser_rl.demo import assets

            path = str(assets.smollm2_dir())  # converted from the packaged GGUF once, then cached
        if not os.path.isdir(path):
            raise ValueError(f"{path!r} does not exist or is not a directory (a local model directory; nothing is downloaded)")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(args.dtype, device)).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        args.parser.error(f"{flag}: the tokenizer of {path!r} has no eos token: sampled responses could never end")
    return model.eval(), tokenizer


def build_rms(args: argparse.Namespace, specs: list[str], flag: str = "--reward-models"):
    """Reward models from specs, moved to the run's device; `module:function` resolves from the current directory."""
    import torch

    from laser_rl.arms import make_arm

    device = resolve_device(args.device)
    # A console script's sys.path lacks the current directory; `python -m` has it. Same specs work in both.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    rms = []
    for spec in specs:
        with flag_errors(args.parser, f"{flag} {spec}"):
            rms.append(make_arm(spec))
    for rm in rms:
        for attr in ("model", "ref_model"):
            module = getattr(rm, attr, None)
            if isinstance(module, torch.nn.Module):
                module.to(device)
    return rms


def make_encoder(model, proj_dim: int, seed: int):
    """The bandit's context encoder; resuming needs the same (hidden size, proj_dim, seed) or its saved state."""
    from laser_rl.context import ContextEncoder
    from laser_rl.lm import hidden_size

    size = hidden_size(model)
    # Projecting up would only add noise dimensions: project only when it shrinks the context.
    return ContextEncoder(size, proj_dim=proj_dim if 0 < proj_dim < size else None, seed=seed)


SELECTOR_FLAGS = ("bandit", "baseline", "alpha", "lam", "discount", "granularity", "feedback")


def make_selector(args: argparse.Namespace, rms: list, context_dim: int | None, **overrides):
    """laser_rl.selector.selector_from_flags on the parsed flags (plus `overrides`); a bad combination is one line."""
    from laser_rl.selector import selector_from_flags

    flags = {**vars(args), **overrides}
    given = [f"--{k} {flags[k]}" for k in SELECTOR_FLAGS if k in vars(args) and flags.get(k) is not None]
    with flag_errors(args.parser, " ".join(given) or "selector flags"):
        return selector_from_flags(rms, flags, context_dim)


def apply_warm_start(args: argparse.Namespace, selector, policy, tokenizer, encoder) -> None:
    from laser_rl.priors import load_preference_set, prior_accuracy_table, warm_start_from_preferences

    if not args.warm_start or selector.bandit is None or not selector.bandit.learns:
        return
    with flag_errors(args.parser, "--warm-start"):
        examples = load_preference_set(args.warm_start)
    rewards = warm_start_from_preferences(selector, examples, policy, tokenizer, encoder, weight=args.warm_start_weight)
    print(f"warm start from {len(examples)} labeled pairs: each RM's preference accuracy")
    print(prior_accuracy_table(rewards, selector.names, [e.get("domain") for e in examples]))


def load_records(args: argparse.Namespace, flag: str, path: str, required: tuple[str, ...]) -> list[dict]:
    """Rows of a local JSONL file; a missing file or field is one line naming `flag`."""
    import datasets

    from laser_rl.lm import load_jsonl

    datasets.disable_progress_bars()  # a bar per small local file is noise
    check_file(args.parser, flag, path)
    with flag_errors(args.parser, flag):
        return load_jsonl(path, required=required)


@functools.cache  # once per process: the logging filters would stack
def quiet_third_party_warnings() -> None:
    """Silence start-up noise the user cannot act on; narrow filters (by message and source), none of laser_rl's."""
    import logging

    # torch.cuda imports pynvml, whose deprecation notice asks the user to report it to torch's maintainers.
    warnings.filterwarnings("ignore", message=r"The pynvml package is deprecated", category=FutureWarning)
    # bitsandbytes (imported by OpenRLHF/peft) suggests `pip install kernels`, a package the project must not shadow.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "pip install kernels" not in r.getMessage())
    # DeepSpeed warns that it fell back to the CPU accelerator, which is what a CPU run wants.
    logging.getLogger("DeepSpeed").addFilter(lambda r: "we were unable to detect it" not in r.getMessage())
