#!/bin/bash
# export both arms and score them beside the published GAN and both baselines (held out, stride 4)
set -e
cd /work/main
mkdir -p /work/eval/s18
for arm in true false; do
  name=$([ $arm = true ] && echo gan-inside || echo gan-whole)
  mmdiff export /work/runs/gan-s18-inside-$arm /work/eval/s18/$name --overwrite
done
# the runs started before model.inside_brain was stored in the generator's config: record it (the run's
# training_info.json holds model.inside_brain: true); it changes nothing in the GAN pipeline's outputs
python - <<'PY'
import json, pathlib
p = pathlib.Path("/work/eval/s18/gan-inside/generator/config.json")
c = json.loads(p.read_text()); c["inside_brain"] = True; p.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
PY
mmdiff evaluate --pipeline /work/eval/s18/gan-inside /work/eval/s18/gan-whole pipelines/mmdiff-gan \
    --data ~/.cache/mmdiff/cpu-v2 --slice-stride 4 --out /work/eval/s18/ab --overwrite --quiet
