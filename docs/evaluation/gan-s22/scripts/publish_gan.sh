#!/bin/bash
# session 22: publish the SSIM-term arm as mmdiff-gan: scored under the card's names beside the session-20
# model it replaces, downstream Dice with the session-19 networks reused, the card exported
set -e
cd /work/main
E=/work/eval/s22
mkdir -p $E/pubnames && rm -rf $E/pubnames/*
cp -r $E/gan-ssim $E/pubnames/mmdiff-gan
cp -r pipelines/mmdiff-gan $E/pubnames/mmdiff-gan-s20
mmdiff evaluate --pipeline $E/pubnames/mmdiff-gan $E/pubnames/mmdiff-gan-s20 --data ~/.cache/mmdiff/cpu-v2 \
  --slice-stride 4 --out docs/evaluation/mmdiff-gan-s22 --overwrite --quiet > /work/runs/s22/pub-eval.log 2>&1
rm -rf $E/downstream && mkdir -p $E/downstream && cp -r /work/eval/downstream-s19/networks $E/downstream/
mmdiff downstream --data ~/.cache/mmdiff/cpu-v2 --pipeline $E/pubnames/mmdiff-gan --steps 1500 --out $E/downstream \
  > /work/runs/s22/downstream.log 2>&1
mkdir -p docs/evaluation/downstream-t1c-s22 && cp $E/downstream/dice.* docs/evaluation/downstream-t1c-s22/
echo done > /work/runs/s22/publish_gan.done
