"""WML lesions up close: real FLAIR, each pipeline's FLAIR (T1 + T2), T1, T2; lesion outlined; zoomed on the
slice of each subject with most lesion. python rims.py OUT.png SUBJECT[,SUBJECT..] PIPELINE [PIPELINE ..]"""
import numpy as np, sys, matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
from pathlib import Path
from mmdiff.evaluation.protocol import load_cases, Task, PipelineMethod, lesion_contrast
from mmdiff.pipelines import load_pipeline
cache = "/root/.cache/mmdiff/cpu-v2"; out, subjects, pipes = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
task = Task.parse("t1+t2->flair")
methods = []
for p in pipes:
    pipe = load_pipeline(p, "gan"); pipe.set_progress_bar_config(disable=True); methods.append((Path(p).name, PipelineMethod(pipe, "g")))
cases = [c for s in ("train", "val", "test") for c in load_cases(cache, s, ["wml"]) if c.case_id.split("-")[0] in subjects]
fig, ax = plt.subplots(len(cases), 3 + len(methods), figsize=(2.6 * (3 + len(methods)), 2.8 * len(cases)), squeeze=False)
for i, case in enumerate(cases):
    z = int(np.argmax(case.lesion.sum((0, 1))))
    xs, ys = np.nonzero(case.lesion[..., z]); cx, cy = int(xs.mean()), int(ys.mean())
    crop = np.s_[max(cx - 40, 0):cx + 40, max(cy - 40, 0):cy + 40, z]
    cols = [("real flair", case.images["flair"])] + [(n, m(case, task)[0]) for n, m in methods] + [("t1", case.images["t1"]), ("t2", case.images["t2"])]
    for j, (name, v) in enumerate(cols):
        c = lesion_contrast(v, case.brain, case.lesion)
        ax[i, j].imshow(np.rot90(v[crop]), cmap="gray", vmin=0, vmax=np.percentile(v[case.brain], 99.5))
        ax[i, j].contour(np.rot90(case.lesion[crop]), levels=[0.5], colors="r", linewidths=0.6)
        ax[i, j].set_title(f"{case.case_id.split('-')[0]} ({case.split}) {name}\nlesion/brain {c:.2f}", fontsize=7); ax[i, j].axis("off")
plt.tight_layout(); plt.savefig(out, dpi=90)
