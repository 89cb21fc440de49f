#!/bin/bash
# session 22: score the base-transfer arm beside the published GAN (the session-21 arms' scores are reused:
# the evaluation is deterministic), its bands of error on the pairs behind, the WML validation subject
set -e
cd /work/main
E=/work/eval/s22
mkdir -p $E/names-base && rm -rf $E/names-base/*
cp -r $E/gan-base $E/names-base/gan-base
cp -r pipelines/mmdiff-gan $E/names-base/mmdiff-gan
mmdiff evaluate --pipeline $E/names-base/gan-base $E/names-base/mmdiff-gan --data ~/.cache/mmdiff/cpu-v2 \
  --slice-stride 4 --out $E/base --overwrite --quiet > /work/runs/s22/base-eval.log 2>&1
python docs/evaluation/gan-s22/scripts/compare.py $E/base/scores.csv /work/eval/s21/l14/scores.csv \
  /work/eval/s21/core/scores.csv /work/eval/s21/ms12/scores.csv $E/soup-eval/scores.csv > $E/base-compare.txt
python docs/evaluation/gan-s22/scripts/bands.py $E/names-base/gan-base > $E/base-bands.txt 2>/dev/null
mmdiff evaluate --pipeline $E/names-base/gan-base $E/names-base/mmdiff-gan --data ~/.cache/mmdiff/cpu-v2 \
  --datasets wml --split val --slice-stride 4 --out $E/base-wml-val --overwrite --quiet > /work/runs/s22/base-val.log 2>&1
echo done > /work/runs/s22/after_base.done
