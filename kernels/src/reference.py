"""Plain torch references for the Triton kernels, with the same signatures and contracts.

They are the core's own functions (laser_rl.bandits: `score_select_torch`, `linear_update_torch`), re-exported here
Liger-style beside the kernels, so `backend="torch"` computes exactly what they compute. Dependencies run one way:
this package imports the core, and the core imports the Triton modules only lazily, when a bandit picks them.
"""

from __future__ import annotations

from laser_rl.bandits import linear_update_torch, score_select_torch

__all__ = ["linear_update_torch", "score_select_torch"]
