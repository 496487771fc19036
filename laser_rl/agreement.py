"""How often do two reward models order a response pair the same way? (The paper's RM-conflict analysis.)

For K reward models and prompts with sampled responses, every pair of responses of the same prompt
is ordered by each RM (first better, tie, second better). The agreement of RMs k and l is the
fraction of pairs they order the same way, ties included as an order of their own, so an RM always
agrees with itself (ones on the diagonal) and the matrix is symmetric. The paper reports two RMs
agreeing on only 43% of MMLU pairs: where they conflict, picking the RM per prompt matters.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from laser_rl.arms import RewardArm, make_arm


def pairwise_orders(scores: Tensor) -> Tensor:
    """Order of every within-prompt response pair (i < j): sign(score_i - score_j), [P * n(n-1)/2], int8.

    scores: [P, n] one RM's scores of n responses per prompt. Pairs never cross prompts.
    """
    scores = torch.as_tensor(scores).float()
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be [prompts, n >= 2], got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")
    i, j = torch.triu_indices(scores.shape[1], scores.shape[1], offset=1)
    return torch.sign(scores[:, i] - scores[:, j]).to(torch.int8).reshape(-1)


def agreement_matrix(orders: Tensor) -> Tensor:
    """[K, K] fraction of pairs on which RM k and RM l give the same order, from orders [K, M]."""
    orders = torch.as_tensor(orders)
    if orders.dim() != 2 or orders.shape[1] == 0:
        raise ValueError(f"orders must be [num_rms, num_pairs >= 1], got shape {tuple(orders.shape)}")
    same = orders.unsqueeze(1) == orders.unsqueeze(0)  # [K, K, M]
    return same.double().mean(dim=2)


@dataclass
class AgreementResult:
    names: list[str]
    matrix: Tensor  # [K, K] over all pairs
    num_pairs: int
    per_domain: dict[str, tuple[Tensor, int]] = field(default_factory=dict)  # domain -> (matrix, pairs)
    label_accuracy: dict[str, float] | None = None  # RM -> fraction of (chosen, rejected) pairs it gets right

    def format(self) -> str:
        blocks = [f"all prompts ({self.num_pairs} pairs)\n" + format_matrix(self.matrix, self.names)]
        for domain, (matrix, pairs) in sorted(self.per_domain.items()):
            blocks.append(f"domain {domain} ({pairs} pairs)\n" + format_matrix(matrix, self.names))
        if self.label_accuracy is not None:
            blocks.append("preference accuracy against the labels (chosen over rejected; ties count 0.5)\n" + "\n".join(
                f"  {name:<24} {acc:.3f}" for name, acc in self.label_accuracy.items()
            ))
        return "\n\n".join(blocks)

    def to_json(self) -> dict:
        return {
            "names": self.names,
            "matrix": self.matrix.tolist(),
            "num_pairs": self.num_pairs,
            "per_domain": {d: {"matrix": m.tolist(), "num_pairs": n} for d, (m, n) in self.per_domain.items()},
            "label_accuracy": self.label_accuracy,
        }


def format_matrix(matrix: Tensor, names: Sequence[str]) -> str:
    width = max(8, max(len(n) for n in names) + 2)
    lines = [" " * width + "".join(f"{n:>{width}}" for n in names)]
    for name, row in zip(names, matrix.tolist()):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{width}.3f}" for v in row))
    return "\n".join(lines)


def score_all(rms: Sequence[RewardArm], prompts: Sequence[str], responses: Sequence[Sequence[str]], labels: Sequence | None = None) -> Tensor:
    """Every RM's scores of every response: [K, P, n]."""
    if len(prompts) == 0:
        raise ValueError("no prompts")
    if len(responses) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
    n = len(responses[0])
    if n < 2 or any(len(r) != n for r in responses):
        raise ValueError("every prompt needs the same number (>= 2) of responses")
    flat_p = [p for p in prompts for _ in range(n)]
    flat_r = [r for rs in responses for r in rs]
    flat_l = None if labels is None else [l for l in labels for _ in range(n)]
    out = []
    for arm in tqdm(rms, desc="scoring with each RM", disable=len(rms) < 2):
        scores = arm.score(flat_p, flat_r, flat_l)
        if not torch.isfinite(scores).all():
            raise ValueError(f"reward model {arm.name!r} returned NaN or inf")
        out.append(scores.reshape(len(prompts), n))
    return torch.stack(out)


def rm_agreement(
    rms: Sequence[RewardArm | str],
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    domains: Sequence[str | None] | None = None,
    labels: Sequence | None = None,
    preferred_first: bool = False,
) -> AgreementResult:
    """The agreement matrix of K RMs over all within-prompt response pairs, overall and per domain.

    preferred_first: the first response of each prompt is the labeled chosen one and the second the
    rejected one; then each RM's accuracy on those labels is reported too.
    """
    rms = [make_arm(rm) for rm in rms]
    if len(rms) < 2:
        raise ValueError("agreement needs at least two reward models")
    if domains is not None and len(domains) != len(prompts):
        raise ValueError(f"{len(domains)} domains for {len(prompts)} prompts")
    names = [rm.name for rm in rms]
    names = [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]  # as the selector names them
    scores = score_all(rms, prompts, responses, labels)  # [K, P, n]
    orders = torch.stack([pairwise_orders(s) for s in scores])  # [K, P * pairs_per_prompt]
    pairs_per_prompt = orders.shape[1] // len(prompts)
    result = AgreementResult(names, agreement_matrix(orders), orders.shape[1])
    if domains is not None:
        tags = [d for d in domains for _ in range(pairs_per_prompt)]
        for domain in sorted({d for d in domains if d is not None}):
            cols = torch.tensor([t == domain for t in tags])
            result.per_domain[domain] = (agreement_matrix(orders[:, cols]), int(cols.sum()))
    if preferred_first:
        diff = scores[:, :, 0] - scores[:, :, 1]  # chosen minus rejected, [K, P]
        acc = ((diff > 0).double() + 0.5 * (diff == 0).double()).mean(dim=1)
        result.label_accuracy = dict(zip(names, acc.tolist()))
    return result


def plot_agreement(result: AgreementResult, path: str) -> None:
    """Heatmaps of the agreement matrix: all prompts, then one panel per domain, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("all prompts", result.matrix, result.num_pairs)] + [
        (f"domain: {d}", m, n) for d, (m, n) in sorted(result.per_domain.items())
    ]
    K = len(result.names)
    size = 1.2 + 0.7 * K
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels) + 1, size), squeeze=False)
    for i, (ax, (title, matrix, pairs)) in enumerate(zip(axes[0], panels)):
        image = ax.imshow(matrix.numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(K), result.names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(K), result.names if i == 0 else [], fontsize=8)  # same RMs on every panel
        for a in range(K):
            for b in range(K):
                value = float(matrix[a, b])
                ax.text(b, a, f"{value:.2f}", ha="center", va="center", fontsize=8, color="black" if value > 0.6 else "white")
        ax.set_title(f"{title} ({pairs} pairs)", fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03, label="fraction of pairs ordered alike")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def save_agreement(result: AgreementResult, json_path: str) -> None:
    with open(json_path, "w") as f:
        json.dump(result.to_json(), f, indent=2)
