"""LASeR in GRPOTrainer against TRL's own multi-reward usage, on the same tiny CPU run (numbers for docs/trl.md).

    python tests/trl_compare.py [--steps 6] [--rms 4]

TRL's way: reward_funcs=[rm_1, ..., rm_K] with reward_weights (every RM scores every completion).
LASeR's way: reward_funcs=[LaserRewardFunction] over the same K RMs (one RM per prompt scores its completions).
Same policy, prompts, seed and GRPOConfig; the RMs are tiny Llama sequence classifiers, larger than the policy so
their cost shows. Prints RM passes (rows through the RMs' forward, counted by hooks), RM forward time, time per optimizer
step, and what LASeR adds per step (the reward call's time minus the RMs': contexts, selection, bandit update).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import build_causal_lm, build_tokenizer  # noqa: E402


def build_rms(tokenizer, k: int):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    rms = []
    for seed in range(k):
        torch.manual_seed(100 + seed)
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, num_labels=1,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        rm = LlamaForSequenceClassification(config).eval()
        rm.config._name_or_path = f"rm{seed}"
        rms.append(rm)
    return rms


class Meter:
    """Forward hooks on every RM: rows scored and seconds spent."""

    def __init__(self, rms):
        self.rows, self.seconds, self._t = 0, 0.0, 0.0
        for rm in rms:
            rm.register_forward_pre_hook(self._pre)
            rm.register_forward_hook(self._post)

    def _pre(self, module, args, kwargs=None):
        self._t = time.perf_counter()

    def _post(self, module, args, output):
        self.seconds += time.perf_counter() - self._t
        self.rows += int(output.logits.shape[0])


class Timed:
    """The reward function with a stopwatch: its total time minus the RMs' is what LASeR adds."""

    def __init__(self, fn):
        self.fn, self.seconds, self.__name__ = fn, 0.0, fn.__name__

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def run(way: str, steps: int, k: int) -> dict:
    from trl import GRPOConfig, GRPOTrainer

    from laser_rl.arms import SequenceClassifierArm
    from laser_rl.context import ContextEncoder
    from laser_rl.integrations.trl import LaserRewardFunction
    from laser_rl.selector import RewardSelector

    sys.path.insert(0, str(Path(__file__).parent))
    from test_trl import PROMPTS

    import datasets

    tokenizer = build_tokenizer("bpe")
    policy = build_causal_lm(tokenizer, seed=0)
    rms = build_rms(tokenizer, k)
    meter = Meter(rms)
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS * 4})
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, per_device_train_batch_size=8, num_generations=4, max_completion_length=16,
            max_steps=steps, learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none",
            use_cpu=True, seed=0, beta=0.0, disable_tqdm=True,
        )
        callbacks = []
        if way == "trl":
            reward_funcs = rms
            args.reward_weights = [1.0 / k] * k
            extra = dict(reward_processing_classes=[tokenizer] * k)
        else:
            encoder = ContextEncoder(policy.config.hidden_size, proj_dim=16)
            selector = RewardSelector([SequenceClassifierArm(rm, tokenizer, name=f"rm{i}") for i, rm in enumerate(rms)],
                                      context_dim=encoder.dim, feedback="spread", seed=0)
            laser = LaserRewardFunction(selector, num_generations=4, encoder=encoder)
            reward_funcs, callbacks, extra = [Timed(laser)], [laser.callback()], {}
        trainer = GRPOTrainer(model=policy, reward_funcs=reward_funcs, args=args, train_dataset=ds,
                              processing_class=tokenizer, callbacks=callbacks, **extra)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
    completions = steps * 8
    laser_seconds = reward_funcs[0].seconds - meter.seconds if way == "laser" else 0.0
    return {"way": way, "rm_passes": meter.rows, "completions": completions, "rm_seconds": meter.seconds,
            "seconds_per_step": wall / steps, "laser_seconds": laser_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rms", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [run(way, args.steps, args.rms) for way in ("trl", "laser")]
    print(f"{'way':<36}{'RM passes':>10}{'per completion':>16}{'RM time/step':>14}{'time/step':>11}{'LASeR adds/step':>17}")
    names = {"trl": f"TRL reward_funcs x{args.rms} + weights", "laser": "LASeR (LaserRewardFunction)"}
    for r in rows:
        print(f"{names[r['way']]:<36}{r['rm_passes']:>10}{r['rm_passes'] / r['completions']:>16.2f}"
              f"{r['rm_seconds'] / args.steps:>13.3f}s{r['seconds_per_step']:>10.3f}s{r['laser_seconds'] / args.steps:>16.3f}s")


if __name__ == "__main__":
    main()
