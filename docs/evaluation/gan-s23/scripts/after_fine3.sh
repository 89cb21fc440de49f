#!/bin/bash
cd /work/main
while [ ! -f /work/runs/s23/fine3.done ]; do sleep 15; done
rm -rf /work/eval/s23/names/mmdiff-gan-fine3 && cp -r /work/eval/s23/gan-fine3 /work/eval/s23/names/mmdiff-gan-fine3
OMP_NUM_THREADS=2 mmdiff evaluate --pipeline /work/eval/s23/names/mmdiff-gan-fine3 --data ~/.cache/mmdiff/cpu-v2 --slice-stride 4 \
  --out /work/eval/s23/fine3-eval --overwrite --quiet > /work/runs/s23/fine3-eval.log 2>&1
python docs/evaluation/gan-s22/scripts/compare.py /work/eval/s23/fine3-eval/scores.csv docs/evaluation/mmdiff-gan-s23/scores.csv > /work/eval/s23/fine3-compare.txt 2>&1
echo done > /work/runs/s23/fine3-eval.done
