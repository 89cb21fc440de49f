#!/bin/bash
# session 21: score the MS x12 arm beside the control (1500 steps as published) and the published GAN
set -e
cd /work/main
E=/work/eval/s21
rm -rf $E/names3; mkdir -p $E/names3
cp -r $E/gan-ms12 $E/names3/gan-ms12
cp -r /work/eval/s20/gan-more $E/names3/gan-more
cp -r pipelines/mmdiff-gan $E/names3/mmdiff-gan
mmdiff evaluate --pipeline $E/names3/gan-ms12 $E/names3/gan-more $E/names3/mmdiff-gan --data ~/.cache/mmdiff/cpu-v2 \
  --slice-stride 4 --out $E/ms12 --overwrite --quiet > /work/runs/s21/ms12-eval.log 2>&1
echo done > /work/runs/s21/after_ms12.done
