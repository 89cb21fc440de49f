#!/bin/bash
# session 22: the diffusion engine on the new predictor (the GAN fine-tuned with the SSIM term): UNet + error model fine-tuned
# from the published mmdiff-ldm on its residuals, calibrated at K = 1, scored beside the published engine.
# usage: ldm.sh PREDICTOR   (an exported GAN pipeline folder)
set -e
cd /work/main
PRED=$1
OMP_NUM_THREADS=2 mmdiff train --config ldm-cpu --output-dir /work/runs/ldm-s22 --max-steps 1500 --max-minutes 24 \
    --init-from pipelines/mmdiff-ldm data.num_workers=0 validation.every=0 train.mixed_precision=bf16 \
    model.predictor.path=$PRED > /work/runs/s22/train-ldm.log 2>&1
mmdiff calibrate /work/runs/ldm-s22/final --data ~/.cache/mmdiff/cpu-v2 --out /work/eval/s22/mmdiff-ldm \
    --slices-per-case 12 --samples 1 > /work/runs/s22/calibrate.log 2>&1
# scored under the names the card uses (the published engine's folder copied as mmdiff-ldm-s20)
mkdir -p /work/eval/s22/ldmnames && cp -r /work/eval/s22/mmdiff-ldm /work/eval/s22/ldmnames/mmdiff-ldm \
    && cp -r pipelines/mmdiff-ldm /work/eval/s22/ldmnames/mmdiff-ldm-s20
mmdiff evaluate --pipeline /work/eval/s22/ldmnames/mmdiff-ldm /work/eval/s22/ldmnames/mmdiff-ldm-s20 \
    --data ~/.cache/mmdiff/cpu-v2 --slice-stride 4 --out /work/eval/s22/ldm-named --overwrite --quiet > /work/runs/s22/ldm-named.log 2>&1
echo done > /work/runs/s22/ldm.done
