"""Coverage of the calibrated interval and uncertainty/error correlation on held-out cases.

    python coverage.py PIPELINE CACHE OUT.json SLICE_STRIDE K [DATASETS,COMMA,SEPARATED]
"""
import json, sys, time
import numpy as np, torch
from scipy.stats import spearmanr
torch.set_num_threads(1)
from mmdiff.evaluation.protocol import load_cases, tasks_for
from mmdiff.pipelines import MMDiffPipeline

pipe_path, cache, out, stride, K = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
pipe = MMDiffPipeline.from_pretrained(pipe_path); pipe.set_progress_bar_config(disable=True)
rows = []
only = sys.argv[6].split(",") if len(sys.argv) > 6 else None
for case in load_cases(cache, "test", only, stride):
    tasks = tasks_for(case.images, "paper")
    if not tasks:
        continue
    task = max(tasks, key=lambda t: len(t.sources))  # the many-to-one task of each case
    t0 = time.time()
    res = pipe({m: case.images[m] for m in task.sources}, dataset=case.dataset, targets=[task.target],
               brain_mask=case.brain, num_inference_steps=10, num_samples=K,
               generator=[torch.Generator().manual_seed(k) for k in range(case.brain.shape[2])])
    pred, unc = res.images[task.target], res.uncertainty[task.target]
    ref = case.images[task.target]
    brain = case.brain
    err = np.abs(pred - ref)[brain]; u = unc[brain]
    cov = float(np.mean(err <= u))
    # in the evaluation's units: each volume / (3 x its healthy-brain median); the interval scales with the image
    from mmdiff.evaluation.protocol import robust_normalise
    healthy = brain & ~case.lesion if case.lesion is not None and (brain & ~case.lesion).any() else brain
    factor = 3 * float(np.median(pred[healthy]))
    pn, rn = robust_normalise(pred, brain, case.lesion), robust_normalise(ref, brain, case.lesion)
    err_n = np.abs(pn - rn)[brain]; u_n = u / factor
    cov_n = float(np.mean(err_n <= u_n))
    rows.append({"dataset": case.dataset, "case": case.case_id, "task": task.name, "voxels": int(brain.sum()),
                 "coverage": cov, "coverage_eval_units": cov_n,
                 "spearman_eval_units": float(spearmanr(u_n, err_n).correlation), "nominal": pipe.config.coverage, "pearson_unc_abs_err": float(np.corrcoef(u, err)[0, 1]),
                 "spearman_unc_abs_err": float(spearmanr(u, err).correlation), "mean_unc": float(u.mean()),
                 "mean_abs_err": float(err.mean()), "seconds": time.time() - t0})
    print(rows[-1], flush=True)
allc = sum(r["coverage"] * r["voxels"] for r in rows) / sum(r["voxels"] for r in rows)
alln = sum(r["coverage_eval_units"] * r["voxels"] for r in rows) / sum(r["voxels"] for r in rows)
json.dump({"K": K, "stride": stride, "rows": rows, "pooled_coverage": allc, "pooled_coverage_eval_units": alln},
          open(out, "w"), indent=2)
print("pooled coverage", allc, "in evaluation units", alln)
