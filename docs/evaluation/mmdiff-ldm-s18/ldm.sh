#!/bin/bash
# the diffusion engine on the inside-brain predictor: UNet + error model fine-tuned on its residuals, calibrated at K = 1, scored
set -e
cd /work/main
OMP_NUM_THREADS=1 mmdiff train --config ldm-cpu --output-dir /work/runs/ldm-s18 --max-steps 1500 --max-minutes 24 \
    --init-from pipelines/mmdiff-ldm data.num_workers=0 validation.every=0 model.predictor.path=/work/eval/s18/gan-inside
mmdiff calibrate /work/runs/ldm-s18/final --data ~/.cache/mmdiff/cpu-v2 --out /work/eval/s18/mmdiff-ldm \
    --slices-per-case 12 --samples 1
mmdiff evaluate --pipeline /work/eval/s18/mmdiff-ldm pipelines/mmdiff-ldm --data ~/.cache/mmdiff/cpu-v2 --slice-stride 4 \
    --out /work/eval/s18/ldm --overwrite --quiet
