#!/bin/bash
# session 20: the diffusion engine on the new predictor (the WML-lesion GAN): UNet + error model fine-tuned
# from the published mmdiff-ldm on its residuals, calibrated at K = 1, scored beside the published engine.
# usage: ldm.sh PREDICTOR   (an exported GAN pipeline folder)
set -e
cd /work/main
PRED=$1
OMP_NUM_THREADS=2 mmdiff train --config ldm-cpu --output-dir /work/runs/ldm-s20 --max-steps 1500 --max-minutes 24 \
    --init-from pipelines/mmdiff-ldm data.num_workers=0 validation.every=0 train.mixed_precision=bf16 \
    model.predictor.path=$PRED > /work/runs/s20/train-ldm.log 2>&1
mmdiff calibrate /work/runs/ldm-s20/final --data ~/.cache/mmdiff/cpu-v2 --out /work/eval/s20/mmdiff-ldm \
    --slices-per-case 12 --samples 1 > /work/runs/s20/calibrate.log 2>&1
# scored under the names the card uses (the published engine's folder copied as mmdiff-ldm-s18)
mkdir -p /work/eval/s20/ldmnames && cp -r /work/eval/s20/mmdiff-ldm /work/eval/s20/ldmnames/mmdiff-ldm \
    && cp -r pipelines/mmdiff-ldm /work/eval/s20/ldmnames/mmdiff-ldm-s18
mmdiff evaluate --pipeline /work/eval/s20/ldmnames/mmdiff-ldm /work/eval/s20/ldmnames/mmdiff-ldm-s18 \
    --data ~/.cache/mmdiff/cpu-v2 --slice-stride 4 --out /work/eval/s20/ldm-named --overwrite --quiet > /work/runs/s20/ldm-named.log 2>&1
