#!/bin/bash
# session 22: score the second SSIM stage beside the published GAN (its scores reused from docs/evaluation/mmdiff-gan-s22)
set -e
cd /work/main
E=/work/eval/s22
mkdir -p $E/names-ssim2 && rm -rf $E/names-ssim2/*
cp -r $E/gan-ssim2 $E/names-ssim2/gan-ssim2
mmdiff evaluate --pipeline $E/names-ssim2/gan-ssim2 --data ~/.cache/mmdiff/cpu-v2 \
  --slice-stride 4 --out $E/ssim2 --overwrite --quiet > /work/runs/s22/ssim2-eval.log 2>&1
python docs/evaluation/gan-s22/scripts/compare.py $E/ssim2/scores.csv docs/evaluation/mmdiff-gan-s22/scores.csv > $E/ssim2-compare.txt
mmdiff evaluate --pipeline $E/names-ssim2/gan-ssim2 --data ~/.cache/mmdiff/cpu-v2 \
  --datasets wml --split val --slice-stride 4 --out $E/ssim2-wml-val --overwrite --quiet > /work/runs/s22/ssim2-val.log 2>&1
echo done > /work/runs/s22/after_ssim2.done
