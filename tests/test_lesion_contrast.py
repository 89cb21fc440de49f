"""Lesion contrast (mean lesion / mean healthy brain), synthetic against real, per label: the figure a
reader would check first, reported beside PSNR/SSIM."""

import numpy as np
import pytest

from mmdiff.evaluation.protocol import contrast_scores, lesion_contrast, score
from mmdiff.evaluation.report import summary_markdown


def _case():
    brain = np.zeros((12, 12, 3), bool)
    brain[1:11, 1:11] = True
    labels = np.zeros(brain.shape, np.uint8)
    labels[3:5, 3:5] = 1   # core
    labels[6:9, 6:9] = 3   # enhancing
    real = brain * 0.3
    real[labels == 1] = 0.3 * 1.1
    real[labels == 3] = 0.3 * 1.5
    return brain, labels, real.astype(np.float32)


def test_lesion_contrast_is_lesion_over_healthy_brain():
    brain, labels, real = _case()
    healthy_only = brain & (labels != 1)  # the healthy brain is the brain outside the region
    assert lesion_contrast(real, healthy_only, labels == 3) == pytest.approx(1.5)
    assert lesion_contrast(real, brain, labels > 0) == pytest.approx((4 * 1.1 + 9 * 1.5) / 13)
    assert np.isnan(lesion_contrast(real, brain, labels == 2))  # no oedema in this case


def test_a_synthesis_that_draws_normal_tissue_over_the_lesion_scores_1_against_the_real_contrast():
    brain, labels, real = _case()
    lesion = labels > 0
    blurred = (brain * 0.3).astype(np.float32)  # no lesion drawn at all
    scores = contrast_scores(blurred, real, brain, lesion, labels)
    assert scores["contrast_label3"] == pytest.approx(1.0) and scores["contrast_label3_real"] == pytest.approx(1.5)
    assert scores["contrast_label1_real"] == pytest.approx(1.1) and np.isnan(scores["contrast_label2"])
    assert scores["contrast_lesion"] == pytest.approx(1.0) and 1.1 < scores["contrast_lesion_real"] < 1.5
    faithful = contrast_scores(real, real, brain, lesion, labels)
    assert faithful["contrast_lesion"] == faithful["contrast_lesion_real"]


def test_score_rows_and_summary_carry_the_contrasts():
    brain, labels, real = _case()
    lesion = labels > 0
    row = score(brain * np.float32(0.3), real, brain, lesion, labels)
    assert row["contrast_label3"] == pytest.approx(1.0)
    rows = [{"dataset": "brats", "case": "a", "split": "test", "task": "t1->t1c", "method": "m", **row}]
    text = summary_markdown(rows)
    assert f"1.00 / {(4 * 1.1 + 9 * 1.5) / 13:.2f} |" in text  # whole lesion, synthetic / real
    assert "| brats | t1->t1c | m | 1.00 / 1.10 | - | 1.00 / 1.50 |" in text


def test_figure_rows_show_a_scored_slice_normalised_like_the_scores():
    """A slice-by-slice model is run on every k-th slice only: its figure panel must not be empty."""
    from mmdiff.evaluation.protocol import EvalCase, Task
    from mmdiff.evaluation.report import _figure_row

    brain, labels, real = _case()
    brain = np.repeat(brain[..., :1], 7, axis=2)
    real = np.repeat(real[..., :1], 7, axis=2)
    lesion = np.repeat((labels > 0)[..., :1], 7, axis=2)
    case = EvalCase("brats", "a", "test", {"t1": real, "t1c": real}, brain, lesion, None, slice(None, None, 3))
    prediction = np.zeros_like(real)
    prediction[..., ::3] = real[..., ::3]  # only the scored slices, as PipelineMethod returns them
    _, panels = _figure_row(case, Task(("t1",), "t1c"), {"m": (prediction, None)})
    synthetic = dict(panels)["m"]
    assert synthetic.max() > 0
