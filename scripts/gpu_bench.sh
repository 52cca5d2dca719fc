#!/usr/bin/env bash
# The GPU table in one device call of at most 8 minutes (README, "GPU path"). Prepare here once:
#   scripts/gpu_carry.sh            # builds .gpu-carry/ (~38 MiB; git-ignored)
# then, as one call of the device tool:
#   run  command: bash scripts/gpu_bench.sh   carry: [".gpu-carry"]   timeout_s: 540
# It unpacks the carry into /tmp, checks the machine (Python, numpy, the libpython the Triton
# stub links), and runs `python -m serving.bench.gpu`, which prints each stage as it ends, the
# table and targets last, and writes $OUT/gpu_bench.json (+ this log and tritonserver's).
# Extra arguments go to serving.bench.gpu (e.g. --concurrency 1,4 --compile). To try the script
# itself on a CPU machine: scripts/gpu_carry.sh 3.11 (that machine's Python), then
#   DEVICE=cpu PYTHON=.venv/bin/python bash scripts/gpu_bench.sh --small
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu-bench}
CARRY=${CARRY:-.gpu-carry}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SITE=/tmp/ldm-site
TRITON=/tmp/ldm-triton
rm -rf "$SITE" "$TRITON"
mkdir -p "$OUT" "$SITE" "$TRITON"
exec > >(tee "$OUT/gpu_bench.log") 2>&1

for f in site.tar.xz tritonserver.tar.xz; do
  if [ ! -f "$CARRY/$f" ]; then
    echo "missing $CARRY/$f: run scripts/gpu_carry.sh on the development machine and carry .gpu-carry"
    exit 2
  fi
done
tar -xJf "$CARRY/site.tar.xz" -C "$SITE" && tar -xJf "$CARRY/tritonserver.tar.xz" -C "$TRITON" || exit 2
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export LDM_TRITON_DIR="$TRITON/tritonserver" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem --format=csv || true
"$PY" - <<'PY' || exit 2
import glob, os, sys, sysconfig
import numpy, torch
print(f"python {sys.version.split()[0]} ({sys.executable}); numpy {numpy.__version__}; torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, GPU {torch.cuda.is_available() and torch.cuda.get_device_name(0)}")
assert numpy.__version__.startswith("1."), "the carried numpy 1.x must come first on PYTHONPATH"
assert torch.from_numpy(numpy.arange(3.0)).sum().item() == 3.0
libdir = sysconfig.get_config_var("LIBDIR") or ""
wanted = f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
found = glob.glob(os.path.join(libdir, wanted)) or [l for l in os.popen("ldconfig -p").read().split() if l.endswith(wanted)]
print(f"{wanted} for the Triton python stub: {found[0] if found else 'NOT FOUND (tritonserver cannot run python models here; the bench measures the engine without Triton)'}")
PY
timeout -k 10 450 "$PY" -m serving.bench.gpu --device "$DEVICE" --out "$OUT" --budget-s "${BUDGET_S:-370}" "$@"
status=$?
[ $status -eq 124 ] && echo "stopped at 450 s: $OUT/gpu_bench.json holds the stages that finished"
exit $status
