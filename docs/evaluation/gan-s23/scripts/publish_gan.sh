#!/bin/bash
# session 23: publish a fine-head arm as mmdiff-gan: scored under the card's names beside the session-22 model it
# replaces, downstream Dice with the session-19 networks reused, the card exported. ARGS: EXPORTED_PIPELINE
set -e
cd /work/main
E=/work/eval/s23
mkdir -p $E/pubnames && rm -rf $E/pubnames/*
cp -r $1 $E/pubnames/mmdiff-gan
cp -r pipelines/mmdiff-gan $E/pubnames/mmdiff-gan-s22
OMP_NUM_THREADS=2 mmdiff evaluate --pipeline $E/pubnames/mmdiff-gan $E/pubnames/mmdiff-gan-s22 --data ~/.cache/mmdiff/cpu-v2 \
  --slice-stride 4 --out docs/evaluation/mmdiff-gan-s23 --overwrite --quiet > /work/runs/s23/pub-eval.log 2>&1
rm -rf $E/downstream && mkdir -p $E/downstream && cp -r /work/eval/downstream-s19/networks $E/downstream/
OMP_NUM_THREADS=2 mmdiff downstream --data ~/.cache/mmdiff/cpu-v2 --pipeline $E/pubnames/mmdiff-gan --steps 1500 --out $E/downstream \
  > /work/runs/s23/downstream.log 2>&1
mkdir -p docs/evaluation/downstream-t1c-s23 && cp $E/downstream/dice.* docs/evaluation/downstream-t1c-s23/
echo done > /work/runs/s23/publish_gan.done
