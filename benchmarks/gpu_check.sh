#!/usr/bin/env bash
# The one prepared GPU check for the Triton kernels (laser_rl.kernels, issue 6), for a lent GPU machine.
#
# Through the device tool, from the repo root, in one call (it fits in ~8 minutes; give it timeout_s 540):
#     bash benchmarks/gpu_check.sh
# Elsewhere: OUT=/some/dir bash benchmarks/gpu_check.sh
#
# The lent machines (nvidia-h100-x1, nvidia-h200) have python3 with torch, triton, transformers, tokenizers and
# pytest, and no network: laser-rl is installed without dependencies or a build-isolation download. It then
#   1. records the card and versions                            -> $OUT/env.txt
#   2. runs tests/test_kernels_*.py (one file per kernel) compiled on CUDA (no interpreter; tf32 checked at 1e-3,
#      the rest at 1e-4), and tests/test_bandit_reliability.py   -> $OUT/test_kernels.log
#   3. profiles linear_update and one LinUCB step at the step target's shape (torch.profiler tables)
#                                                                -> $OUT/profile.txt
#   4. runs benchmarks/kernels.py, the targets' shapes first, tables rewritten after every shape
#                                                                -> $OUT/kernels.log, kernels.md, kernels.json
# and prints the tables last (the tool returns the end of the output). Each step has its own time limit, so a
# slow step leaves the others' files behind.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/laser_rl_gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3
start=$SECONDS

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
  $PY -c "import sys, torch, triton, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# laser_rl.kernels is mapped from kernels/src by pyproject's package-dir, so the package must be installed.
if ! $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . > "$OUT/install.log" 2>&1; then
  # Fallback (this working tree is a throwaway copy): make laser_rl/kernels a link to kernels/src.
  echo "editable install failed (see install.log); linking laser_rl/kernels -> kernels/src" | tee -a "$OUT/env.txt"
  ln -sfn ../kernels/src laser_rl/kernels
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c "import laser_rl.kernels as k; print('laser_rl.kernels from', k.__file__)" | tee -a "$OUT/env.txt"

echo "== tests/test_kernels_*.py and tests/test_bandit_reliability.py on CUDA"
timeout 240 $PY -m pytest -q -s -rs -p no:cacheprovider tests/test_kernels_*.py tests/test_bandit_reliability.py \
  > "$OUT/test_kernels.log" 2>&1
test_rc=$?
grep -E "passed|failed|error" "$OUT/test_kernels.log" | tail -3
# the largest relative errors the tests printed, per kernel and precision
$PY - "$OUT/test_kernels.log" <<'PYEOF'
import re, sys
worst = {}
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"\b(score|update) \S+ (?:(triton|torch) )?B=.* (ieee|tf32|tf32x3): (.*)$", line)
    if m:
        for name, err in re.findall(r"(\w+) ([0-9.e+-]+)", m.group(4)):
            key = f"{m.group(1)} {m.group(2) or 'triton'} {m.group(3)} {name}"
            worst[key] = max(worst.get(key, 0.0), float(err))
    elif "rounds" in line:
        print(line.strip().lstrip(".s"))
for key, err in sorted(worst.items()):
    print(f"max error {key}: {err:.1e}")
PYEOF
echo "tests exit code: $test_rc ($((SECONDS - start)) s so far)"

echo "== profile at B=1024, d=4096, K=8 (top GPU kernels of each table)"
timeout 150 $PY benchmarks/kernels.py --profile "$OUT/profile.txt" > "$OUT/profile.log" 2>&1
echo "profile exit code: $? ($((SECONDS - start)) s so far)"
awk '/^== /{print; n=0; next} /^-----/{next} /Name/{next} {if (n++ < 6) print substr($0, 1, 56) "  self " $(NF-3) ", avg " $(NF-1) " x" $NF}' \
  "$OUT/profile.txt" 2>/dev/null

echo "== benchmarks/kernels.py"
left=$((500 - (SECONDS - start)))
timeout "$left" $PY benchmarks/kernels.py --md "$OUT/kernels.md" --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
bench_rc=$?
grep -E "^B=|ceilings|SMs" "$OUT/kernels.log"
sed -n '/^Compiled kernels:/,/^$/p' "$OUT/kernels.log"
echo "benchmark exit code: $bench_rc (124: stopped at its ${left} s limit; the tables hold the shapes done)"
echo "total $((SECONDS - start)) s"
echo
cat "$OUT/kernels.md" 2>/dev/null || tail -40 "$OUT/kernels.log"
exit $(( test_rc != 0 || bench_rc != 0 ))
