"""Bandit contexts: the policy's pooled hidden state of each prompt, optionally projected and normalized.

The paper uses the last-token hidden state of the prompt from the policy (d = 4096 for Llama-3-8B).
A fixed random projection shrinks d so LinUCB's d x d statistics stay cheap, and L2 normalization
keeps contexts on one scale so the ridge prior and exploration bonus mean the same thing all run.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from laser_rl.lm import prefill

POOLINGS = ("last", "mean")


def pool_hidden_states(hidden: Tensor, attention_mask: Tensor, pooling: str = "last") -> Tensor:
    """Pool hidden states [B, T, H] over real tokens (mask [B, T], 1 = token) into float32 [B, H].

    "last": the hidden state at the last real token (the paper's context). It is found as the index
    of the last 1 in the mask, so left- and right-padded batches both work.
    "mean": the mean over real tokens only (the reference code averaged over padding too).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}, expected one of {POOLINGS}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden states must be [batch, seq, hidden], got shape {tuple(hidden.shape)}")
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match hidden states "
            f"[batch, seq] = {tuple(hidden.shape[:2])}"
        )
    mask = attention_mask.to(hidden.device).bool()
    counts = mask.sum(dim=1)
    if (counts == 0).any():
        empty = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"rows {empty} have no tokens in attention_mask: nothing to pool")

    hidden = hidden.float()
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask, positions, -1).max(dim=1).values  # [B]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    # masked_fill rather than multiply: a padded position may hold NaN (fully masked attention), and NaN * 0 = NaN.
    summed = hidden.masked_fill(~mask.unsqueeze(-1), 0.0).sum(dim=1)
    return summed / counts.unsqueeze(-1).float()


class ContextEncoder:
    """Turns pooled hidden states into bandit contexts.

    Steps, in order: an optional fixed random projection to `proj_dim` (Gaussian entries / sqrt(proj_dim),
    drawn once from `seed` and saved in state_dict, so contexts mean the same thing all run long),
    optional L2 normalization, and an optional constant 1 appended last as a bias feature (lets a linear
    bandit learn each arm's mean reward apart from the context).
    """

    def __init__(
        self,
        input_dim: int,
        proj_dim: int | None = None,
        normalize: bool = True,
        bias: bool = True,
        seed: int = 0,
    ):
        if int(input_dim) < 1:
            raise ValueError(f"input_dim must be >= 1, got {input_dim}")
        if proj_dim is not None and int(proj_dim) < 1:
            raise ValueError(f"proj_dim must be >= 1 or None, got {proj_dim}")
        self.input_dim = int(input_dim)
        self.proj_dim = None if proj_dim is None else int(proj_dim)
        self.normalize = bool(normalize)
        self.bias = bool(bias)
        self.seed = int(seed)
        self.projection: Tensor | None = None
        if self.proj_dim is not None:
            # 1/sqrt(k) scaling keeps squared norms unchanged in expectation (Johnson-Lindenstrauss).
            gen = torch.Generator().manual_seed(self.seed)
            self.projection = torch.randn(self.input_dim, self.proj_dim, generator=gen) / math.sqrt(self.proj_dim)
        self.dim = (self.proj_dim or self.input_dim) + int(self.bias)

    def __call__(self, hidden: Tensor) -> Tensor:
        """[B, input_dim] in any float dtype -> float32 [B, dim] on the same device."""
        if hidden.dim() != 2:
            raise ValueError(
                f"expected pooled hidden states [batch, {self.input_dim}], got shape {tuple(hidden.shape)}"
            )
        if hidden.shape[1] != self.input_dim:
            raise ValueError(f"hidden size mismatch: expected input_dim={self.input_dim}, got {hidden.shape[1]}")
        x = hidden.float()
        if self.projection is not None:
            x = x @ self.projection.to(x.device)
        if self.normalize:
            x = torch.nn.functional.normalize(x, dim=-1)  # an all-zero row stays zero (eps), never NaN
        if self.bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=-1)
        return x

    def state_dict(self) -> dict:
        return {
            "input_dim": self.input_dim,
            "proj_dim": self.proj_dim,
            "normalize": self.normalize,
            "bias": self.bias,
            "seed": self.seed,
            "projection": None if self.projection is None else self.projection.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("input_dim", "proj_dim", "normalize", "bias"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"ContextEncoder state has {key}={state[key]!r}, this encoder has {getattr(self, key)!r}"
                )
        # The saved matrix wins over the seed: contexts must match the run that trained the bandit.
        self.seed = int(state["seed"])
        self.projection = None if state["projection"] is None else state["projection"].detach().cpu().float().clone()


@torch.no_grad()
def prompt_hidden_states(
    model,
    tokenizer,
    prompts: list[str],
    pooling: str = "last",
    batch_size: int = 16,
    max_length: int = 2048,
    device: str | torch.device | None = None,
) -> Tensor:
    """Last-layer hidden states of a HF causal LM, pooled per prompt: float32 [len(prompts), H] on CPU.

    The prompts are tokenized as given (no chat template; laser_rl.lm.prompt_contexts gives the policy's
    view, as sampling encodes it). Position ids are derived from the attention mask (laser_rl.lm.prefill),
    so left padding gives the same result as right padding or no padding at all (HF would otherwise count
    the pads as positions, which shifts models with absolute position embeddings such as GPT-2).
    """
    if len(prompts) == 0:
        raise ValueError("prompts is empty: nothing to encode")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()  # dropout would make the same prompt give different contexts
    try:
        pooled = []
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(
                list(prompts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            mask = batch["attention_mask"]
            empty = torch.nonzero(mask.sum(dim=1) == 0).flatten()
            if len(empty) > 0:
                raise ValueError(f"prompts {[start + int(i) for i in empty]} tokenize to no tokens")
            out = prefill(model, batch["input_ids"], mask, hidden=True, cache=False, logits_to_keep=None, device=device)
            pooled.append(pool_hidden_states(out.hidden_states[-1], mask, pooling).cpu())
    finally:
        model.train(was_training)
    return torch.cat(pooled, dim=0)
