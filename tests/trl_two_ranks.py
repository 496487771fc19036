"""Run by tests/test_trl.py under `torchrun --nproc_per_node 2` (gloo, CPU): LASeR in GRPOTrainer on two ranks.

3 completions per rank and num_generations=2, so prompt group 1 straddles the ranks (rank 0 holds its first
completion, rank 1 its second). Each rank writes its selector's state and its RMs' call counts to
<out>/rank<r>.pt for the test to compare.
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


def main(out: str) -> None:
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    tokenizer = build_tokenizer("bpe")
    policy = build_causal_lm(tokenizer, seed=0)
    laser = make_laser(tokenizer, feedback="spread", domain_column="domain")
    args = GRPOConfig(
        output_dir=out, per_device_train_batch_size=3, num_generations=2, max_completion_length=6, max_steps=3,
        learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        beta=0.0, disable_tqdm=True, ddp_backend="gloo",
    )
    trainer = GRPOTrainer(model=policy, reward_funcs=[laser], args=args, train_dataset=dataset(),
                          processing_class=tokenizer, callbacks=[laser.callback()])
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    logged = [row["laser/rm_passes"] for row in trainer.state.log_history if "laser/rm_passes" in row]
    torch.save({
        "world": world,
        "state": laser.selector.state_dict(),
        "calls": [rm.fn.calls for rm in laser.selector.rms],
        "last_arms": laser.last_arms,
        "logged_rm_passes": logged,
    }, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
