"""The CPU compatibility shim: `import openrlhf.models` on a machine without CUDA.

Used by the OpenRLHF launch (in every Ray worker, see launch.WORKER_SETUP_HOOK) and by the CPU code
paths that reuse OpenRLHF's models and losses (the demo, iterative DPO). Importing this module needs
only torch.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import torch


def ensure_openrlhf_importable() -> None:
    """Let `import openrlhf.models` work on a machine without CUDA.

    OpenRLHF imports flash_attn for its pure-PyTorch padding helpers (flash_attn.bert_padding), but
    flash_attn/__init__ loads the compiled CUDA extension `flash_attn_2_cuda`, which cannot be built
    without a GPU toolchain. Where that extension is missing (flash-attn installed as a Python-only
    wheel, see scripts/install_cpu.sh) an empty module stands in for it; calling a flash-attention
    kernel would still fail loudly. Where the real extension exists, nothing changes.

    Without CUDA, flash_attn's Triton cross-entropy (which OpenRLHF's log_probs_from_logits tries
    first, falling back to PyTorch only on ImportError) cannot run, so it is made unimportable there.
    """
    if not torch.cuda.is_available():
        sys.modules.setdefault("flash_attn.ops.triton.cross_entropy", None)  # None: import raises ImportError
    if "flash_attn_2_cuda" in sys.modules or importlib.util.find_spec("flash_attn_2_cuda") is not None:
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise ImportError(
            "OpenRLHF needs flash-attn. On a GPU machine: pip install flash-attn; on a CPU-only machine: "
            "FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE "
            "pip install --no-build-isolation flash-attn==2.8.3 (or run scripts/install_cpu.sh)"
        )
    sys.modules["flash_attn_2_cuda"] = types.ModuleType("flash_attn_2_cuda")
