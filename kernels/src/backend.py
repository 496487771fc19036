"""The Triton backend of the linear bandits: importing this module registers the kernels with the core.

laser_rl.bandits loads it by name (LinearBandit(backend="triton"), or "auto" on CUDA) and never imports it by
statement, so dependencies run one way: kernels -> core.
"""

from __future__ import annotations

from laser_rl.bandits import register_backend

from .scoring import INTERPRETED, score_select
from .update import linear_update

register_backend("triton", score_select, linear_update, runs_on_cpu=INTERPRETED)
