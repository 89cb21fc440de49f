"""view_crop.py DATASET TASK OUT.png PIPE...: lesion-centred crops (axial, and a coronal plane) of each pipeline's output beside the real one."""
import sys, numpy as np, torch, matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
sys.path.insert(0, "/work/main")
from mmdiff.evaluation.protocol import load_cases, PipelineMethod, Task
from mmdiff.pipelines.loading import load_pipeline
from pathlib import Path
torch.set_num_threads(2)
ds, task, out = sys.argv[1:4]; pipes = sys.argv[4:]
src, tgt = task.split("->"); t = Task(tuple(src.split("+")), tgt)
methods = [PipelineMethod(load_pipeline(p), Path(p).name) for p in pipes]
cases = [c for c in load_cases("/root/.cache/mmdiff/cpu-v2", "test", datasets=[ds], slice_stride=1)]
fig, ax = plt.subplots(2 * len(cases), 2 + len(methods), figsize=(2.6 * (2 + len(methods)), 5.4 * len(cases)))
for i, case in enumerate(cases):
    lesion = np.asarray(case.lesion) if case.lesion is not None else np.asarray(case.brain)
    z = int(np.argmax(lesion.sum((0, 1)))); xs, ys = np.nonzero(lesion[..., z])
    cx, cy = int(xs.mean()), int(ys.mean()); r = 40
    x0, y0 = max(cx - r, 0), max(cy - r, 0)
    outs = [np.asarray(case.images[t.sources[0]]), np.asarray(case.images[tgt])] + [m(case, t)[0] for m in methods]
    names = [t.sources[0], "real " + tgt] + [m.name for m in methods]
    for j, (im, n) in enumerate(zip(outs, names)):
        ax[2 * i, j].imshow(np.rot90(im[x0:x0 + 2 * r, y0:y0 + 2 * r, z]), cmap="gray", vmin=0, vmax=0.8)
        ax[2 * i, j].set_title(f"{n} {case.case_id[:14]} z{z}", fontsize=7)
        ax[2 * i + 1, j].imshow(np.rot90(im[x0:x0 + 2 * r, cy, :]), cmap="gray", vmin=0, vmax=0.8)
        ax[2 * i + 1, j].set_title("coronal", fontsize=7)
for a in ax.flat: a.set_axis_off()
plt.tight_layout(); plt.savefig(out, dpi=90)
