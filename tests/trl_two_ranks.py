"""Run by tests/test_trl.py under `torchrun --nproc_per_node 2` (gloo, CPU): LASeR in GRPOTrainer on two ranks.

3 completions per rank and num_generations=2, so prompt group 1 straddles the ranks (rank 0 holds its first
completion, rank 1 its second). Both ways run, one after the other: plain GRPOTrainer with `spread`, and
LaserGRPOTrainer with `pair_loss` (log-probs gathered over the ranks). Each rank writes its selector's state
and its RMs' call counts to <out>/<way>_rank<r>.pt for the test to compare.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

from test_trl import dataset, make_laser  # noqa: E402
from conftest import build_causal_lm, build_tokenizer  # noqa: E402


def run(out: str, way: str) -> None:
    from trl import GRPOConfig, GRPOTrainer

    from laser_rl.integrations.trl import LaserGRPOTrainer

    rank = int(os.environ.get("RANK", "0"))  # torchrun sets it; the process group starts later, with GRPOConfig
    tokenizer = build_tokenizer("bpe")
    policy = build_causal_lm(tokenizer, seed=0)
    if way == "pair_loss":  # TRL builds the reference model from the policy's path (saved by the test)
        policy = os.path.join(out, "policy")
    laser = make_laser(tokenizer, feedback="spread" if way == "plain" else "pair_loss", domain_column="domain")
    args = GRPOConfig(
        output_dir=os.path.join(out, way), per_device_train_batch_size=3, num_generations=2, max_completion_length=6,
        max_steps=3, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        beta=0.0 if way == "plain" else 0.1, disable_tqdm=True, ddp_backend="gloo",
    )
    if way == "plain":
        trainer = GRPOTrainer(model=policy, reward_funcs=[laser], args=args, train_dataset=dataset(),
                              processing_class=tokenizer, callbacks=[laser.callback()])
    else:
        trainer = LaserGRPOTrainer(policy, args=args, train_dataset=dataset(), processing_class=tokenizer, laser=laser)
    trainer.train()
    logged = [row["laser/rm_passes"] for row in trainer.state.log_history if "laser/rm_passes" in row]
    torch.save({
        "world": dist.get_world_size() if dist.is_initialized() else 1,
        "state": laser.selector.state_dict(),
        "calls": [rm.fn.calls for rm in laser.selector.rms],
        "last_arms": laser.last_arms,
        "logged_rm_passes": logged,
    }, os.path.join(out, f"{way}_rank{rank}.pt"))


def main(out: str) -> None:
    """out/policy must hold conftest's build_causal_lm(seed=0), saved before the ranks start."""
    torch.set_num_threads(1)
    for way in ("plain", "pair_loss"):  # one process start (TRL's import is most of the time) for both ways
        run(out, way)


if __name__ == "__main__":
    main(sys.argv[1])
