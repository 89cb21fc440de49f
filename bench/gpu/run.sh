#!/usr/bin/env bash
# The lent GPU's one command (issue 11): from the repo root, with the pack of bench/gpu/pack.py in .gpu/
#   device run: command "bash bench/gpu/run.sh", carry [".gpu"], timeout_s 570
# installs the packages the device lacks, rebuilds the slice cache (packed real cases + phantom cohorts
# simulated there), trains the one-step predictor under a wall-time budget, exports it (fp16
# safetensors) and leaves in $OUT: log.txt, metrics.jsonl, training_info.json, the last validation
# grid, the exported pipeline as mmdiff-gan-gpu.tar.gz (split into .part-NN files if over 15 MiB).
#
# Settings (environment): CONFIG (gan-gpu), TOTAL_MIN (8.3: the whole command's budget),
# RESERVE_MIN (1.8: kept for the training process's start-up and initial validation, which come before
# its clock starts, and for the final validation, export and copying), STEPS (the run's max_steps;
# default: the config's), WORKERS (16), PACK (.gpu), WORK (/tmp/mmdiff-gpu), PYTHON (python3),
# OUT (./gpu-out where unset). Further arguments are config overrides (KEY=VALUE) for training.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${OUT:=$PWD/gpu-out}"
: "${CONFIG:=gan-gpu}" "${TOTAL_MIN:=8.3}" "${RESERVE_MIN:=1.8}" "${STEPS:=}" "${WORKERS:=16}"
: "${PACK:=.gpu}" "${WORK:=/tmp/mmdiff-gpu}" "${PYTHON:=python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_MININTERVAL=20
mkdir -p "$OUT"

main() {
  echo "== $(date -u +%FT%TZ) bench/gpu/run.sh: config $CONFIG, budget ${TOTAL_MIN} min"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  local site=""
  if [[ -f "$PACK/site.tar.xz" ]]; then
    site=/tmp/mmdiff-site
    rm -rf "$site" && mkdir -p "$site"  # Python's tarfile: no xz program needed there
    "$PYTHON" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" "$PACK/site.tar.xz" "$site"
  fi
  export PYTHONPATH="$PWD${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}"
  if [[ -n "$site" ]]; then "$PYTHON" -c "import torch, diffusers, monai, nibabel; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| diffusers', diffusers.__version__, '| monai', monai.__version__, '| nibabel', nibabel.__version__)"; fi

  rm -rf "$WORK" && mkdir -p "$WORK"
  echo "== $(date -u +%T) cache (packed real cases + phantoms, $WORKERS workers)"
  "$PYTHON" bench/gpu/unpack.py --pack "$PACK" --cache "$WORK/cache" --workers "$WORKERS"

  local minutes
  minutes=$(awk -v t="$TOTAL_MIN" -v e="$SECONDS" -v r="$RESERVE_MIN" 'BEGIN { m = t - e / 60 - r; if (m < 0.2) m = 0.2; printf "%.2f", m }')
  echo "== $(date -u +%T) train $CONFIG for at most $minutes min (${SECONDS}s spent so far)"
  local steps=()
  [[ -n "$STEPS" ]] && steps=("train.max_steps=$STEPS")
  "$PYTHON" -m mmdiff.train --config "$CONFIG" --output-dir "$WORK/run" --max-minutes "$minutes" \
    "data.cache=$WORK/cache" "${steps[@]}" "$@"

  echo "== $(date -u +%T) export (fp16)"
  "$PYTHON" -m mmdiff.cli export "$WORK/run" "$WORK/mmdiff-gan-gpu" --dtype float16 \
    --training-note "trained in one run on one lent H200 by bench/gpu/run.sh ($CONFIG, bf16): packed real training cases plus the phantom cohorts"
  "$PYTHON" -c "import sys, tarfile; t = tarfile.open(sys.argv[1], 'w:gz'); t.add(sys.argv[2], arcname='mmdiff-gan-gpu'); t.close()" \
    "$OUT/mmdiff-gan-gpu.tar.gz" "$WORK/mmdiff-gan-gpu"
  if (( $(stat -c %s "$OUT/mmdiff-gan-gpu.tar.gz") > 15 * 1048576 )); then
    split -b 15M -d "$OUT/mmdiff-gan-gpu.tar.gz" "$OUT/mmdiff-gan-gpu.tar.gz.part-"
    rm "$OUT/mmdiff-gan-gpu.tar.gz"
  fi
  cp "$WORK/run/metrics.jsonl" "$OUT/"
  cp "$WORK/run/final/training_info.json" "$OUT/"
  local grid
  grid=$(ls "$WORK/run/validation/"*.png 2>/dev/null | sort | tail -n 1 || true)
  [[ -n "$grid" ]] && cp "$grid" "$OUT/validation-$(basename "$grid")"
  echo "== $(date -u +%T) done in ${SECONDS}s; \$OUT holds:"
  ls -l "$OUT"
}

set -o pipefail
main "$@" 2>&1 | tee "$OUT/log.txt"
