"""site_swap.py OUT [PIPELINE]: the real cohorts' held-out cases, each scored with every dataset id the GAN
knows and with none (the null embedding), to see which site setting serves a scan best when its own is
unknown. Writes OUT/scores.csv and OUT/summary.md (`mmdiff evaluate`'s files; methods named `as <site>`)."""
import sys
from dataclasses import replace

from mmdiff.evaluation.protocol import PipelineMethod
from mmdiff.evaluation.report import evaluate
from mmdiff.pipelines import load_pipeline


class AsSite(PipelineMethod):
    """The pipeline told that every case comes from ``site`` (``None``: the null dataset)."""

    def __init__(self, pipe, site):
        super().__init__(pipe, f"as {site or 'null'}", unseen_site=site is None)
        self.site = site

    def __call__(self, case, task):
        return super().__call__(case if self.site is None else replace(case, dataset=self.site), task)


out = sys.argv[1]
pipe = load_pipeline(sys.argv[2] if len(sys.argv) > 2 else "pipelines/mmdiff-gan")
pipe.set_progress_bar_config(disable=True)
sites = [None, *pipe.generator.config.dataset_names]
evaluate("/root/.cache/mmdiff/cpu-v2", [AsSite(pipe, s) for s in sites], out, datasets=["brats", "ms", "wml"],
         slice_stride=4, figures=False, progress=False)
