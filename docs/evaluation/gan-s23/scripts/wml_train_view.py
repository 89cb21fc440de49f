"""A WML training subject: real FLAIR, the GAN's FLAIR (T1 + T2), T2, T1, lesion outline; the slices with most lesion."""
import numpy as np, sys, scipy.ndimage as nd, matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
from mmdiff.evaluation.protocol import load_cases, Task, PipelineMethod
from mmdiff.pipelines import load_pipeline
cache = "/root/.cache/mmdiff/cpu-v2"; ds, split, cid, out = sys.argv[1:5]
pipe = load_pipeline("/work/main/pipelines/mmdiff-gan", "gan"); pipe.set_progress_bar_config(disable=True)
task = Task.parse(sys.argv[5] if len(sys.argv) > 5 else "t1+t2->flair")
case = next(c for c in load_cases(cache, split, [ds]) if c.case_id.startswith(cid))
G = PipelineMethod(pipe, "g")(case, task)[0]
z = np.argsort(case.lesion.sum((0, 1)))[-2:]
labels, n = nd.label(case.lesion); sizes = nd.sum(case.lesion, labels, range(1, n + 1))
print(case.case_id, "lesion voxels", int(case.lesion.sum()), "components", n, "median size", np.median(sizes), "brain", int(case.brain.sum()))
cols = [("real " + task.target, case.images[task.target]), ("gan", G)] + [(s, case.images[s]) for s in task.sources]
fig, ax = plt.subplots(len(z), len(cols), figsize=(3 * len(cols), 3 * len(z)))
for i, k in enumerate(sorted(z)):
    ys, xs = np.nonzero(case.brain[..., k]); crop = np.s_[ys.min():ys.max(), xs.min():xs.max(), k]
    for j, (name, v) in enumerate(cols):
        ax[i, j].imshow(np.rot90(v[crop]), cmap="gray", vmin=0, vmax=np.percentile(v[case.brain], 99.5))
        ax[i, j].contour(np.rot90(case.lesion[crop]), levels=[0.5], colors="r", linewidths=0.5)
        ax[i, j].set_title(f"{name} z{k}", fontsize=8); ax[i, j].axis("off")
plt.tight_layout(); plt.savefig(out, dpi=80)
