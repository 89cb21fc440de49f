import numpy as np, sys, matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
from mmdiff.evaluation.protocol import load_cases, Task, PipelineMethod, VoxelwiseRegression, robust_normalise
from mmdiff.pipelines import load_pipeline
cache = "/root/.cache/mmdiff/cpu-v2"
ds, t = sys.argv[1], sys.argv[2]; out = sys.argv[3]; pipes = sys.argv[4:] or ["pipelines/mmdiff-gan"]
task = Task.parse(t); reg = VoxelwiseRegression(cache)
case = next(iter(load_cases(cache, "test", [ds], slice_stride=4)))
sl = np.s_[..., ::4]; m = case.brain[sl]; les = None if case.lesion is None else case.lesion[sl]
imgs = {"real": case.images[task.target], "regression": reg(case, task)[0]}
for p in pipes: imgs[p.rstrip("/").split("/")[-1]] = PipelineMethod(load_pipeline(p, "gan"), "g")(case, task)[0]
imgs = {k: robust_normalise(v[sl], m, les) for k, v in imgs.items()}
n = m.shape[-1]; zs = [n // 2, 2 * n // 3]
fig, axes = plt.subplots(len(zs), len(imgs), figsize=(4 * len(imgs), 4 * len(zs)))
for i, z in enumerate(zs):
    for j, (k, v) in enumerate(imgs.items()):
        axes[i, j].imshow(v[..., z].T, cmap="gray", vmin=0, vmax=.9, origin="lower"); axes[i, j].set_title(f"{k} z{z}"); axes[i, j].axis("off")
plt.tight_layout(); plt.savefig(out, dpi=55)
