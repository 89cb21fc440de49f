#!/bin/bash
# export the three arms, score them beside the published GAN and both baselines (held out, stride 4),
# each also at an unseen site (null dataset); then all four with the sources' contrast changed (gamma 0.8)
set -e
cd /work/main
mkdir -p /work/eval/s19
for arm in control drop3 drop3g; do
  mmdiff export /work/runs/gan-s19-$arm /work/eval/s19/gan-$arm --overwrite > /dev/null
done
ln -sfn /work/main/pipelines/mmdiff-gan /work/eval/s19/mmdiff-gan-s18
P="/work/eval/s19/gan-control /work/eval/s19/gan-drop3 /work/eval/s19/gan-drop3g /work/eval/s19/mmdiff-gan-s18"
mmdiff evaluate --pipeline $P --unseen-site --data ~/.cache/mmdiff/cpu-v2 --slice-stride 4 --out /work/eval/s19/abc --overwrite --quiet > /work/runs/s19/abc.log 2>&1
mmdiff evaluate --pipeline $P --source-gamma 0.8 --data ~/.cache/mmdiff/cpu-v2 --slice-stride 4 --out /work/eval/s19/abc-g0.8 --overwrite --quiet > /work/runs/s19/abc-g0.8.log 2>&1
