#!/bin/bash
# session 21: score the label-1 = 14 arm beside the control (1500 steps, label 1 = 8) and the published GAN
set -e
cd /work/main
E=/work/eval/s21
mkdir -p $E/names
rm -rf $E/names/*
cp -r /work/eval/s21/gan-l14 $E/names/gan-l14
cp -r /work/eval/s20/gan-more $E/names/gan-more
cp -r pipelines/mmdiff-gan $E/names/mmdiff-gan
mmdiff evaluate --pipeline $E/names/gan-l14 $E/names/gan-more $E/names/mmdiff-gan --data ~/.cache/mmdiff/cpu-v2 \
  --slice-stride 4 --out $E/l14 --overwrite --quiet > /work/runs/s21/l14-eval.log 2>&1
mmdiff evaluate --pipeline $E/names/gan-l14 $E/names/gan-more $E/names/mmdiff-gan --data ~/.cache/mmdiff/cpu-v2 \
  --datasets wml --split val --slice-stride 4 --out $E/l14-wml-val --overwrite --quiet > /work/runs/s21/l14-val.log 2>&1
# whole-volume FLAIR of both WML held-out subjects, for the crops
for C in 301D00262-20040114 302D10226-20040128; do
  D=/work/shared/data/wml-cbica/$C/$C
  for P in gan-l14 gan-more mmdiff-gan; do
    mmdiff synthesize --t1 $D.T1.byte_nii.coreg.smooth.brain.correct.match.nii.gz --t2 $D.T2.byte_nii.coreg.smooth.brain.correct.match.nii.gz \
      --brain-mask /work/shared/data/wml-cbica/$C/${C}_foreground.nii.gz --targets flair --pipeline $E/names/$P --dataset wml \
      --out $E/wml-$C/$P --overwrite > /dev/null 2>&1
  done
  python docs/evaluation/gan-s20-wml/scripts/wml_lesions.py $C $E/wml-$C/mmdiff-gan/flair_synthetic.nii.gz,$E/wml-$C/gan-more/flair_synthetic.nii.gz,$E/wml-$C/gan-l14/flair_synthetic.nii.gz $E/wml-$C.png > $E/wml-$C.txt
done
echo done > /work/runs/s21/after_l14.done
