import numpy as np, sys
from mmdiff.evaluation.protocol import load_cases, Task, PipelineMethod, VoxelwiseRegression, robust_normalise
from mmdiff.pipelines import load_pipeline
import matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
cache = "/root/.cache/mmdiff/cpu-v2"
pipe = load_pipeline("pipelines/mmdiff-gan", "gan")
gan = PipelineMethod(pipe, "gan"); reg = VoxelwiseRegression(cache)
rows = []
for ds, t in [("ms", "t1+t2->flair"), ("ms", "t1->t1c"), ("stroke", "flair->dwi")]:
    task = Task.parse(t)
    case = next(load_cases(cache, "test", [ds], slice_stride=4))
    sl = np.s_[..., ::4]; m = case.brain[sl]; les = None if case.lesion is None else case.lesion[sl]
    R, G, RG = (robust_normalise(v[sl], m, les) for v in (case.images[task.target], gan(case, task)[0], reg(case, task)[0]))
    k = int(np.argmax(m.sum((0, 1)) + (0 if les is None else 50 * les.sum((0, 1)))))
    rows.append((f"{ds} {t} slice {k*4}", [case.images[s][sl][..., k] for s in task.sources] + [R[..., k], G[..., k], RG[..., k], abs(G - R)[..., k], abs(RG - R)[..., k]], task.sources))
fig, axes = plt.subplots(len(rows), 7, figsize=(21, 3.2 * len(rows)))
for r, (title, ims, srcs) in enumerate(rows):
    names = list(srcs) + ["real", "gan", "regression", "|gan-real|", "|reg-real|"]
    ims = ims[-7:]; names = names[-7:]
    for c in range(7):
        ax = axes[r, c]; ax.axis("off")
        if c < len(ims):
            im = np.rot90(ims[c]); x0, x1 = int(im.shape[0] * .15), int(im.shape[0] * .85)
            ax.imshow(im, cmap="gray", vmin=0, vmax=0.5 if "|" in names[c] else 1); ax.set_title(f"{title if c == 0 else ''}\n{names[c]}", fontsize=8)
plt.tight_layout(); plt.savefig(sys.argv[1], dpi=70)
