"""Select + update cost of our LinUCB against the reference code's approach, side by side in one run.

The reference code (LASeR-MAB) inverts every arm's d x d matrix with numpy at every selection:
O(K d^3) per call. Ours keeps A^-1 current with Woodbury updates: O(K B d^2) to score B prompts,
O(m d^2) to add m rows to an arm.

Rows:
  reference  one selection (one mean context, the paper's per-batch granularity) + one update
  ours/batch the same work with our LinUCB
  ours/prompt one arm per prompt for all B prompts + the update with all B rewards

    python benchmarks/select_overhead.py                 # d in {1024, 4096}, K in {4, 8}, B in {64, 1024}
    python benchmarks/select_overhead.py --dims 256 --arms 4 --batches 64   # a quick look
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from laser_rl.bandits import LinUCB


class ReferenceLinUCB:
    """What the reference code does (numpy, float64): invert A_k at every selection."""

    def __init__(self, num_arms: int, dim: int, alpha: float = 0.1):
        self.A = [np.eye(dim) for _ in range(num_arms)]
        self.b = [np.zeros(dim) for _ in range(num_arms)]
        self.alpha = alpha

    def select(self, x: np.ndarray) -> int:
        scores = []
        for A, b in zip(self.A, self.b):
            A_inv = np.linalg.inv(A)
            theta = A_inv @ b
            scores.append(theta @ x + self.alpha * np.sqrt(x @ A_inv @ x))
        return int(np.argmax(scores))

    def update(self, x: np.ndarray, arm: int, reward: float) -> None:
        self.A[arm] += np.outer(x, x)
        self.b[arm] += reward * x


def timed(fn, repeats: int) -> float:
    """Median wall time in seconds over `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--arms", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-repeats", type=int, default=1, help="the reference takes seconds per call at d=4096")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; numpy {np.__version__}")
    header = f"{'d':>5} {'K':>2} {'B':>5} | {'reference s':>11} {'ours/batch s':>12} {'speedup':>8} | {'ours/prompt s':>13} {'prompt/ref':>10}"
    print(header)
    print("-" * len(header), flush=True)
    for d in args.dims:
        for K in args.arms:
            ref = ReferenceLinUCB(K, d)
            x = np.random.default_rng(0).standard_normal(d)
            x /= np.linalg.norm(x)
            ref_s = timed(lambda: ref.update(x, ref.select(x), 0.5), args.reference_repeats)
            ours = LinUCB(K, d)
            X1 = torch.nn.functional.normalize(torch.randn(1, d), dim=1)
            ours_batch_s = timed(lambda: ours.update(X1, ours.select(X1), torch.tensor([0.5])), args.repeats)
            for B in args.batches:
                bandit = LinUCB(K, d)
                X = torch.nn.functional.normalize(torch.randn(B, d), dim=1)
                rewards = torch.rand(B) - 0.5
                ours_prompt_s = timed(lambda: bandit.update(X, bandit.select(X), rewards), args.repeats)
                print(
                    f"{d:>5} {K:>2} {B:>5} | {ref_s:>11.4f} {ours_batch_s:>12.5f} {ref_s / ours_batch_s:>7.0f}x |"
                    f" {ours_prompt_s:>13.4f} {ours_prompt_s / ref_s:>10.3f}",
                    flush=True,  # a row is the progress: the reference takes seconds per call at d = 4096
                )
    print("speedup: reference / ours at the paper's granularity (one selection per batch);")
    print("prompt/ref: one arm for each of B prompts, as a fraction of ONE reference selection.")


if __name__ == "__main__":
    main()
