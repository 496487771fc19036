"""laser_rl.kernels: Triton kernels for the linear bandits' heavy arithmetic (source folder: kernels/src/).

- `score_select`: means x . theta_k, widths sqrt(x^T A_k^-1 x) and the LinUCB / Thompson argmax for B contexts and
  K arms, fused so the B x K x d product never reaches device memory (scoring.py).
- `linear_update`: every arm's A, A^-1 (Woodbury), b and theta updated with its rows of the batch, the d x d work for
  all arms in one launch (update.py).
Each has a plain torch reference with the same signature (`score_select_torch`, `linear_update_torch`): the core's own
functions in laser_rl.bandits, re-exported here. Dependencies run one way, kernels -> core: laser_rl.bandits imports
the Triton modules only inside its backend seam, when a bandit is built with them.

The bandits pick the pair once, in `LinearBandit.__init__`, with `backend="auto" | "triton" | "torch"`. The Triton
modules are imported on first use (they need the triton package); set TRITON_INTERPRET=1 before that to run them on
CPU tensors. Tile loops shared by the kernels are `@triton.jit` helpers in tiles.py.
"""

from __future__ import annotations

from typing import Any

from .reference import linear_update_torch, score_select_torch
from .utils import interpret_mode, triton_available

_LAZY = {"score_select": "scoring", "linear_update": "update"}

__all__ = [
    "interpret_mode", "linear_update", "linear_update_torch", "score_select", "score_select_torch", "triton_available",
]


def __getattr__(name: str) -> Any:
    # Lazy, so `import laser_rl.kernels` works without triton and the torch references stay usable.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
