#!/bin/bash
# session 21: score the BraTS-core arm beside the control (1500 steps as published) and the published GAN; T1C crops
set -e
cd /work/main
E=/work/eval/s21
rm -rf $E/names2; mkdir -p $E/names2
cp -r $E/gan-core $E/names2/gan-core
cp -r /work/eval/s20/gan-more $E/names2/gan-more
cp -r pipelines/mmdiff-gan $E/names2/mmdiff-gan
mmdiff evaluate --pipeline $E/names2/gan-core $E/names2/gan-more $E/names2/mmdiff-gan --data ~/.cache/mmdiff/cpu-v2 \
  --slice-stride 4 --out $E/core --overwrite --quiet > /work/runs/s21/core-eval.log 2>&1
python docs/evaluation/gan-s18-inside/scripts/view_crop.py brats "t1+t2+flair->t1c" $E/core-t1c-crops.png $E/names2/mmdiff-gan $E/names2/gan-more $E/names2/gan-core > /dev/null 2>&1
echo done > /work/runs/s21/after_core.done
