#!/usr/bin/env bash
# One script for a GPU machine (under 8 minutes): the GPU tests, the training-speed benchmark on CUDA
# (ours vs the reference loop, a CIFAR-size ResNet-34→18 pair and a 224-px torchvision pair with
# random weights, plus the fraction of step time the GPU is busy) and a short KD³ run on the demo
# world when its clean/label/teacher outputs are present (carry data/clean data/label data/teacher).
#
#   benchmarks/gpu_check.sh          # on a GPU machine
#   benchmarks/gpu_check.sh --dry    # anywhere: the same steps at toy sizes on CPU (checks the script)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DRY=0; [ "${1:-}" = "--dry" ] && DRY=1
if [ $DRY = 1 ]; then DEV=cpu; SPEED=(--dry --pairs demo cifar); EPOCHS=1
else DEV=cuda; SPEED=(--pairs cifar imagenet --steps 30 --pool 20000 --batch 256 --workers 8); EPOCHS=5
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: use --dry')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
echo "== GPU tests"
if [ $DRY = 1 ]; then "$PY" -m pytest -q -m gpu tests/test_gpu.py || [ $? = 5 ]  # 5: all skipped/deselected
else "$PY" -m pytest -q -m gpu tests/test_gpu.py; fi
echo "== training speed ($DEV)"
"$PY" benchmarks/train_speed.py --device "$DEV" "${SPEED[@]}"
echo "== short KD3 run on the demo world ($DEV)"
if [ -f data/clean/images.npy ] && [ -f data/label/logits.npy ] && [ -f data/teacher/teacher.json ]; then
  tmp=$(mktemp -d)
  "$PY" - "$tmp" "$DEV" "$EPOCHS" <<'PYEOF'
import sys, time, yaml
from pathlib import Path
from pipeline import distill_stage
from pipeline.config import DistillConfig, build, read_params
tmp, dev, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
raw = read_params("params.yaml")["distill"]
raw.update(device=dev, epochs=epochs, out_dir=f"{tmp}/distill", metrics_dir=f"{tmp}/metrics")
if not Path(raw["eval"].get("fashion_mnist") or "/nonexistent").exists():
    raw["eval"] = {"eval_dir": None, "fashion_mnist": None}
if not Path(raw.get("truth") or "/nonexistent").exists():
    raw["truth"] = None
t0 = time.time()
s = distill_stage.run(build(DistillConfig, raw, "distill"))
print(f"demo KD3 {epochs} epochs on {dev}: {time.time() - t0:.1f} s wall, {s['images_per_second']} img/s, "
      f"validation accuracy {s['val_accuracy_last']}")
PYEOF
  rm -rf "$tmp"
else
  echo "skipped: no demo outputs (run make demo, or carry data/clean data/label data/teacher)"
fi
