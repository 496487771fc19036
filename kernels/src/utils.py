"""Shared helpers for the Triton kernels: interpreter detection, device checks, block-size rounding.

Nothing here imports triton, so `laser_rl.kernels` (and the bandits' backend check) can ask whether the kernels
can run without paying for, or failing on, a triton import.
"""

from __future__ import annotations

import importlib.util
import os

import torch

# Values that triton itself reads as true for TRITON_INTERPRET.
_TRUE = {"1", "true", "yes", "on", "y"}


def triton_available() -> bool:
    """Whether the triton package is installed (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpret_mode() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter (kernels then run on CPU tensors, in numpy).

    Triton reads the variable when a kernel is decorated, i.e. when its module is imported: it must be set
    before `laser_rl.kernels.scoring` / `.update` are first imported.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def check_device(*tensors: torch.Tensor, interpreted: bool) -> None:
    """Triton kernels run on CUDA tensors, or on any tensors when their module was imported under the interpreter
    (`interpreted`); all on one device."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not interpreted:
        raise ValueError(
            f"the Triton kernels run on CUDA tensors, got {device}; on the CPU set TRITON_INTERPRET=1 before "
            "triton is imported, or use the torch reference"
        )


def check_state(theta: torch.Tensor, A_inv: torch.Tensor) -> tuple[int, int]:
    """The bandit state the kernels read: float32 theta [K, d] and A_inv [K, d, d], contiguous. Returns (K, d)."""
    if theta.dim() != 2 or A_inv.dim() != 3 or A_inv.shape != (theta.shape[0], theta.shape[1], theta.shape[1]):
        raise ValueError(f"expected theta [K, d] and A_inv [K, d, d], got {tuple(theta.shape)}, {tuple(A_inv.shape)}")
    for name, t in (("theta", theta), ("A_inv", A_inv)):
        if t.dtype != torch.float32:
            raise ValueError(f"the Triton kernels keep float32 statistics, got {name} in {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (the kernels index it as a dense array)")
    return theta.shape[0], theta.shape[1]


def block(n: int, lo: int, hi: int) -> int:
    """The power of two covering n, clamped to [lo, hi]: small problems get small tiles, so fewer lanes are masked."""
    p = 1 << max(int(n) - 1, 0).bit_length()
    return max(lo, min(hi, p))
