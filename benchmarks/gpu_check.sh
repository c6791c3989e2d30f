#!/usr/bin/env bash
# One script for a GPU machine that has nothing but the working tree and its own python3 (torch,
# torchvision, numpy, pillow, pyyaml, typer, tqdm, pytest; no imagehash, icrawler or dvc), in about
# five minutes and never more than eight:
#   1. versions, GPU, nvidia-smi and /dev/shm (DataLoader workers share memory through it);
#   2. the GPU tests (tests/test_gpu.py);
#   3. the training-speed benchmark on CUDA: ours against the reference loop, a CIFAR-size
#      ResNet-34→18 pair and a 224-px torchvision ResNet-50→18 pair, random weights, plus the share
#      of step time the GPU is busy; each table row is printed as soon as it is measured;
#   4. a short KD³ run on the demo's outputs, when data/clean, data/label and data/teacher are there
#      (carry those three folders; KD3_DATA names another folder that holds them).
# Each step runs under its own time limit and the script goes on past a failed one; the last lines
# say how each step ended, and the exit status is non-zero when any failed.
#
#   benchmarks/gpu_check.sh [--dry] [FOLDER]
#
# FOLDER (default: $OUT, else benchmarks/out/gpu_check) receives gpu_check.log (everything printed),
# train_speed-cuda.md, gpu_tests.xml, demo_kd3.json and steps.txt. --dry runs the same steps on the
# CPU at toy sizes (checks the script anywhere). PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
DRY=0
if [ "${1:-}" = "--dry" ]; then DRY=1; shift; fi
RESULTS=${1:-${OUT:-benchmarks/out/gpu_check}}
PY=${PYTHON:-python3}
DATA=${KD3_DATA:-data}
mkdir -p "$RESULTS" || { echo "gpu_check: cannot create $RESULTS" >&2; exit 2; }
RESULTS=$(cd "$RESULTS" && pwd)
LOG=$RESULTS/gpu_check.log
: >"$LOG" || { echo "gpu_check: cannot write $LOG" >&2; exit 2; }
exec > >(tee -a "$LOG") 2>&1
TEE=$!
export PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1  # rows as they come; no plugins the machine lacks

if [ $DRY = 1 ]; then
  DEV=cpu; EPOCHS=1; SPEED=(--dry --pairs demo)
else
  DEV=cuda; EPOCHS=5; SPEED=(--pairs cifar imagenet --steps 30 --pool 10000 --batch 256)
fi
LIMIT_TESTS=120 LIMIT_SPEED=240 LIMIT_DEMO=120  # seconds; 8 minutes if every step hit its limit
STEPS=$RESULTS/steps.txt
: >"$STEPS"
FAILED=0

step() {  # step NAME LIMIT COMMAND...: run under `timeout`, record how it ended, never stop the script
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo
  echo "== $name (limit ${limit} s)"
  timeout --kill-after=15 "$limit" "$@"
  rc=$?
  local took=$((SECONDS - start)) verdict=ok
  if [ $rc = 124 ] || [ $rc = 137 ]; then verdict="TIMED OUT after ${limit} s"
  elif [ $rc != 0 ]; then verdict="FAILED (exit $rc)"; fi
  [ "$verdict" = ok ] || FAILED=$((FAILED + 1))
  printf '%-28s %s, %d s\n' "$name" "$verdict" "$took" | tee -a "$STEPS"
}

echo "== gpu_check $([ $DRY = 1 ] && echo --dry) on $(hostname), $(date -u +%FT%TZ); results in $RESULTS"
echo "python: $(command -v "$PY" || echo "$PY not found")"
step "versions" 60 "$PY" - "$DEV" <<'PYEOF'
import platform, sys
import numpy, PIL, torch, torchvision
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}), torchvision {torchvision.__version__}, numpy {numpy.__version__}, "
      f"pillow {PIL.__version__}, {torch.get_num_threads()} threads")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}")
elif sys.argv[1] == "cuda":
    sys.exit("no CUDA device visible to torch (run with --dry to check the script on a CPU)")
PYEOF
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm --format=csv
else
  echo "nvidia-smi: not found"
fi
SHM_BYTES=$(df -B1 --output=size /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
echo "/dev/shm: $(df -h --output=size /dev/shm 2>/dev/null | tail -1 | tr -d ' ') ($SHM_BYTES bytes)"
WORKERS=8
if [ -z "$SHM_BYTES" ] || [ "$SHM_BYTES" -lt $((2 << 30)) ]; then
  WORKERS=2
  echo "/dev/shm under 2 GiB: the reference loop uses 2 DataLoader workers instead of 8"
fi
[ $DRY = 1 ] && WORKERS=2

gpu_tests() {  # pyproject's addopts name pytest-timeout, which that machine lacks: replace them
  "$PY" -m pytest -o addopts= -ra --strict-markers -m gpu -p no:cacheprovider \
    --junitxml="$RESULTS/gpu_tests.xml" tests/test_gpu.py || return
  [ "$DRY" = 1 ] && return  # on a CPU they skip; on the GPU machine a skipped test is a failed check
  "$PY" - "$RESULTS/gpu_tests.xml" <<'PYEOF'
import sys, xml.etree.ElementTree as ET
suite = ET.parse(sys.argv[1]).getroot().find("testsuite")
if int(suite.get("tests")) == 0 or int(suite.get("skipped")) > 0:
    sys.exit(f"GPU tests: {suite.get('skipped')} of {suite.get('tests')} skipped on the GPU machine")
PYEOF
}
export -f gpu_tests
export PY DRY RESULTS
step "GPU tests" $LIMIT_TESTS bash -c gpu_tests

step "training speed ($DEV)" $LIMIT_SPEED "$PY" benchmarks/train_speed.py --device "$DEV" "${SPEED[@]}" \
  --workers "$WORKERS" --out "$RESULTS/train_speed-$DEV.md"

if [ -f "$DATA/clean/images.npy" ] && [ -f "$DATA/label/logits.npy" ] && [ -f "$DATA/teacher/teacher.json" ]; then
  tmp=$(mktemp -d)
  step "KD3 on the demo ($DEV)" $LIMIT_DEMO "$PY" - "$DATA" "$tmp" "$DEV" "$EPOCHS" "$RESULTS/demo_kd3.json" \
    "$DRY" <<'PYEOF'
import json, sys, time
from pathlib import Path
from pipeline import distill_stage
from pipeline.config import DistillConfig, build, read_params
data, tmp, dev, epochs, out, dry = sys.argv[1:7]
raw = read_params("params.yaml")["distill"]
raw.update(device=dev, epochs=int(epochs), out_dir=f"{tmp}/distill", metrics_dir=f"{tmp}/metrics",
           clean_dir=f"{data}/clean", label_dir=f"{data}/label", teacher_dir=f"{data}/teacher")
if dry == "1":
    raw["batch_size"] = min(raw.get("batch_size", 128), 32)  # toy sizes
if not Path(raw["eval"].get("fashion_mnist") or "/nonexistent").exists():
    raw["eval"] = {"eval_dir": None, "fashion_mnist": None}
if not Path(raw.get("truth") or "/nonexistent").exists():
    raw["truth"] = None
t0 = time.time()
s = distill_stage.run(build(DistillConfig, raw, "distill"))
s["wall_seconds"] = round(time.time() - t0, 1)
Path(out).write_text(json.dumps(s, indent=1) + "\n")
print(f"demo KD3 {epochs} epochs on {dev}: {s['wall_seconds']} s wall, {s['images_per_second']} img/s, "
      f"final loss {s['final_loss']}, validation accuracy {s['val_accuracy_last']}")
PYEOF
  rm -rf "$tmp"
else
  echo
  echo "== KD3 on the demo: skipped, no demo outputs in $DATA (carry data/clean data/label data/teacher)"
  printf '%-28s %s\n' "KD3 on the demo ($DEV)" "skipped (no demo outputs)" | tee -a "$STEPS" >/dev/null
fi

echo
echo "== summary ($SECONDS s in all; log: $LOG)"
cat "$STEPS"
[ $FAILED = 0 ] || echo "gpu_check: $FAILED step(s) failed"
exec >&- 2>&-  # let tee see the end of its input and finish writing the log before the script exits
wait "$TEE"
exit $((FAILED > 0))
