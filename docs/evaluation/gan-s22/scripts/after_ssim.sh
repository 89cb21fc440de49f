#!/bin/bash
# session 22: score the SSIM-term arm beside the published GAN (the session-21 arms' scores are reused:
# the evaluation is deterministic), its bands of error on the pairs behind, the WML validation subject
set -e
cd /work/main
E=/work/eval/s22
mkdir -p $E/names-ssim && rm -rf $E/names-ssim/*
cp -r $E/gan-ssim $E/names-ssim/gan-ssim
# the published GAN scored in after_base.sh (deterministic: the same scores)
mmdiff evaluate --pipeline $E/names-ssim/gan-ssim --data ~/.cache/mmdiff/cpu-v2 \
  --slice-stride 4 --out $E/ssim --overwrite --quiet > /work/runs/s22/ssim-eval.log 2>&1
python docs/evaluation/gan-s22/scripts/compare.py $E/ssim/scores.csv $E/base/scores.csv /work/eval/s21/l14/scores.csv \
  /work/eval/s21/core/scores.csv /work/eval/s21/ms12/scores.csv $E/soup-eval/scores.csv > $E/ssim-compare.txt
python docs/evaluation/gan-s22/scripts/bands.py $E/names-ssim/gan-ssim > $E/ssim-bands.txt 2>/dev/null
mmdiff evaluate --pipeline $E/names-ssim/gan-ssim --data ~/.cache/mmdiff/cpu-v2 \
  --datasets wml --split val --slice-stride 4 --out $E/ssim-wml-val --overwrite --quiet > /work/runs/s22/ssim-val.log 2>&1
echo done > /work/runs/s22/after_ssim.done
