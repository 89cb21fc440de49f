#!/bin/bash
# after train_fine.sh: held-out scores beside the published, WML validation, per-case FLAIR lesion contrast
cd /work/main
while [ ! -f /work/runs/s23/fine.done ]; do sleep 20; done
mkdir -p /work/eval/s23/names && rm -rf /work/eval/s23/names/mmdiff-gan-fine && cp -r /work/eval/s23/gan-fine /work/eval/s23/names/mmdiff-gan-fine
OMP_NUM_THREADS=2 mmdiff evaluate --pipeline /work/eval/s23/names/mmdiff-gan-fine --data ~/.cache/mmdiff/cpu-v2 --slice-stride 4 \
  --out /work/eval/s23/fine-eval --overwrite --quiet > /work/runs/s23/fine-eval.log 2>&1
python docs/evaluation/gan-s22/scripts/compare.py /work/eval/s23/fine-eval/scores.csv docs/evaluation/mmdiff-gan-s22/scores.csv > /work/eval/s23/fine-compare.txt 2>&1
OMP_NUM_THREADS=2 python /work/eval/s23/percase.py /work/eval/s23/gan-fine wml "t1+t2->flair" 2>/dev/null | grep -v Loading > /work/eval/s23/percase-wml-flair-fine.txt
OMP_NUM_THREADS=2 mmdiff evaluate --pipeline /work/eval/s23/names/mmdiff-gan-fine --data ~/.cache/mmdiff/cpu-v2 --slice-stride 4 \
  --datasets wml --split val --out /work/eval/s23/fine-wml-val --overwrite --quiet > /work/runs/s23/fine-wmlval.log 2>&1
echo done > /work/runs/s23/fine-eval.done
