"""laser-rl: LASeR (Learning to Adaptively Select Rewards) for online RL.

The core is framework-free (torch only): bandits pick one reward model per prompt, arms score
samples, feedback signals teach the bandit. OpenRLHF-specific code lives in its own module.

The names below are imported on first use (PEP 562), so `import laser_rl.cli` (the `laser-rl` command's
--help, its warning filters) runs before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "laser_rl.bandits": (
        "BANDITS", "UCB1", "Bandit", "Exp3", "FixedArm", "LinUCB", "LinearEpsilonGreedy", "LinearThompson",
        "RandomArm", "RoundRobin", "make_bandit",
    ),
    "laser_rl.selector": ("BASELINES", "ENSEMBLE", "RewardSelector"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'laser_rl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static checkers and IDEs see the eager imports
    from laser_rl.bandits import (
        BANDITS, UCB1, Bandit, Exp3, FixedArm, LinearEpsilonGreedy, LinearThompson, LinUCB, RandomArm, RoundRobin,
        make_bandit,
    )
    from laser_rl.selector import BASELINES, ENSEMBLE, RewardSelector
