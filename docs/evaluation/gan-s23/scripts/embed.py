"""MS pairs with other datasets' embeddings (and none): is the one-patient MS embedding the problem?"""
import numpy as np, dataclasses, torch
from mmdiff.evaluation.protocol import load_cases, Task, PipelineMethod, robust_normalise
from mmdiff.evaluation import metrics
from mmdiff.pipelines import load_pipeline
cache = "/root/.cache/mmdiff/cpu-v2"
pipe = load_pipeline("/work/main/pipelines/mmdiff-gan", "gan"); pipe.set_progress_bar_config(disable=True)
print(pipe.generator.config.dataset_names if hasattr(pipe.generator.config, "dataset_names") else "")
def score(p, r, m):
    f = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)
    return float(metrics.psnr(f(p), f(r), f(m), pooled=True)), float(metrics.ssim(f(p), f(r), f(m), pooled=True))
for t in ("t1+t2->flair", "t1->t1c", "t1+t2+flair->t1c", "t2->flair"):
    task = Task.parse(t)
    for ds in ("ms", None, "brats", "wml", "bratslike", "glioma"):
        res = []
        for case in load_cases(cache, "test", ["ms"], slice_stride=4):
            sl = np.s_[..., ::4]; m = case.brain[sl]; les = None if case.lesion is None else case.lesion[sl]
            if ds is None:
                meth = PipelineMethod(pipe, "g", unseen_site=True); c = case
            else:
                meth = PipelineMethod(pipe, "g"); c = dataclasses.replace(case, dataset=ds)
            G = robust_normalise(meth(c, task)[0][sl], m, les); R = robust_normalise(case.images[task.target][sl], m, les)
            res.append(score(G, R, m))
        print(f"{t:18s} {str(ds):10s} {np.mean([r[0] for r in res]):.2f} / {np.mean([r[1] for r in res]):.3f}", flush=True)
