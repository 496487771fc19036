"""laser-rl: LASeR (Learning to Adaptively Select Rewards) for online RL.

The core is framework-free (torch only): bandits pick one reward model per prompt, arms score
samples, feedback signals teach the bandit. OpenRLHF-specific code lives in its own module.
"""

from laser_rl.bandits import (
    BANDITS,
    UCB1,
    Bandit,
    Exp3,
    FixedArm,
    LinearEpsilonGreedy,
    LinearThompson,
    LinUCB,
    RandomArm,
    RoundRobin,
    make_bandit,
)
from laser_rl.selector import BASELINES, ENSEMBLE, RewardSelector

__version__ = "0.1.0"

__all__ = [
    "BANDITS", "BASELINES", "ENSEMBLE", "UCB1", "Bandit", "Exp3", "FixedArm", "LinUCB", "LinearEpsilonGreedy",
    "LinearThompson", "RandomArm", "RewardSelector", "RoundRobin", "make_bandit",
]
