"""Per BraTS case: does the GAN's FLAIR (from T1 + T2) follow the case's own lesion contrast?"""
import numpy as np, sys
from mmdiff.evaluation.protocol import load_cases, Task, PipelineMethod, lesion_contrast
from mmdiff.pipelines import load_pipeline
cache = "/root/.cache/mmdiff/cpu-v2"
pipe = load_pipeline(sys.argv[1] if len(sys.argv) > 1 else "/work/main/pipelines/mmdiff-gan", "gan"); pipe.set_progress_bar_config(disable=True)
gan = PipelineMethod(pipe, "gan")
ds = sys.argv[2] if len(sys.argv) > 2 else "brats"; task = Task.parse(sys.argv[3] if len(sys.argv) > 3 else "t1+t2->flair")
rows = []
for split in ("train", "val", "test"):
    for case in load_cases(cache, split, [ds], slice_stride=4):
        if case.lesion is None or not case.lesion.any():
            continue
        sl = np.s_[..., ::4]; m = case.brain[sl]; les = case.lesion[sl]
        G = gan(case, task)[0][sl]
        r = [lesion_contrast(case.images[s][sl], m, les) for s in task.sources]
        rows.append((split, case.case_id, *r, lesion_contrast(case.images[task.target][sl], m, les), lesion_contrast(G, m, les)))
        print(f"{split:5s} {case.case_id:28s} " + " ".join(f"{s} {v:.2f}" for s, v in zip(task.sources, r)) + f"  real {rows[-1][-2]:.2f}  gan {rows[-1][-1]:.2f}", flush=True)
a = np.array([r[2:] for r in rows], float)
print("corr(real target, gan)", np.corrcoef(a[:, -2], a[:, -1])[0, 1], " slope", np.polyfit(a[:, -2], a[:, -1], 1)[0])
for i, s in enumerate(task.sources):
    print(f"corr(real {s}, real target)", np.corrcoef(a[:, i], a[:, -2])[0, 1], f" corr(real {s}, gan)", np.corrcoef(a[:, i], a[:, -1])[0, 1])
