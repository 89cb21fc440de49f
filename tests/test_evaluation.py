"""The evaluation protocol: tasks, lesion-robust scores, baselines, and `mmdiff evaluate`'s reports."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from PIL import Image

from mmdiff.cli import main
from mmdiff.evaluation.protocol import (PAPER_TASKS, CopyNearest, EvalCase, PipelineMethod, Task, VoxelwiseRegression,
                                        load_cases, robust_normalise, score, tasks_for, uncertainty_scores,
                                        with_source_gamma)
from mmdiff.evaluation.report import evaluate, summary_markdown
from test_pipelines import tiny_gan, tiny_ldm


def test_tasks_parse_and_follow_the_available_modalities():
    task = Task.parse("t1+t2+flair->t1c")
    assert task.sources == ("t1", "t2", "flair") and task.target == "t1c" and task.name == "t1+t2+flair->t1c"
    with pytest.raises(ValueError, match="SOURCES->TARGET"):
        Task.parse("t1,t1c")
    brats = tasks_for(["t1", "t2", "t1c", "flair"], "paper")
    assert [t.name for t in brats] == ["t1->t1c", "t2->flair", "t1->t2", "t1+t2->flair", "t1+t2+flair->t1c"]
    assert len(tasks_for(["t1", "t2", "t1c", "flair", "dwi", "adc"], "paper")) == len(PAPER_TASKS) - 1
    wml = tasks_for(["t1", "t2", "flair", "pd"], "paper")  # a cohort with PD gets mmdiff's PD task
    assert [t.name for t in wml] == ["t2->flair", "t1->t2", "t1+t2->flair", "t1+t2+flair->pd"]
    subsets = tasks_for(["t1", "t2", "flair"], "all-subsets")
    assert len(subsets) == 3 * 3  # per target: 2 singles + 1 pair
    assert Task(("t1", "t2"), "flair") in subsets
    with pytest.raises(ValueError, match="unknown protocol"):
        tasks_for(["t1"], "everything")


def _case(seed=0, lesion_value=None):
    rng = np.random.default_rng(seed)
    brain = np.zeros((24, 24, 4), bool)
    brain[4:20, 4:20] = True
    image = (rng.uniform(0.3, 0.8, brain.shape) * brain).astype(np.float32)
    lesion = np.zeros_like(brain)
    lesion[8:12, 8:12] = True
    if lesion_value is not None:
        image[lesion] = lesion_value
    return image, brain, lesion


def test_a_bright_lesion_does_not_change_the_normalisation_of_healthy_brain():
    image, brain, lesion = _case()
    bright, _, _ = _case(lesion_value=50.0)
    healthy = brain & ~lesion
    np.testing.assert_allclose(robust_normalise(image, brain, lesion)[healthy],
                               robust_normalise(bright, brain, lesion)[healthy])
    # a global gain is not an error
    np.testing.assert_allclose(robust_normalise(3 * image, brain, lesion), robust_normalise(image, brain, lesion),
                               atol=1e-6)


def test_scores_per_region():
    image, brain, lesion = _case()
    perfect = score(image, image, brain, lesion)
    assert perfect["psnr_brain"] > 100 and perfect["ssim_brain"] == pytest.approx(1.0, abs=1e-4)
    assert perfect["mae_lesion"] == 0
    noisy = image + np.random.default_rng(1).normal(0, 0.05, image.shape).astype(np.float32) * brain
    scores = score(noisy, image, brain, lesion)
    assert 15 < scores["psnr_brain"] < 40 and scores["ssim_brain"] < 0.99
    assert scores["psnr_whole"] > scores["psnr_brain"]  # background inflates whole-image scores
    assert math.isnan(score(noisy, image, brain, None)["psnr_lesion"])


def test_spread_and_correlation_tell_a_flattened_image_from_a_better_one():
    image, brain, lesion = _case()
    perfect = score(image, image, brain, lesion)
    assert perfect["spread_brain"] == pytest.approx(1.0) and perfect["corr_brain"] == pytest.approx(1.0)
    noisy = image + np.random.default_rng(1).normal(0, 0.1, image.shape).astype(np.float32) * brain
    mean = float(noisy[brain].mean())
    flattened = np.where(brain, mean + 0.5 * (noisy - mean), 0).astype(np.float32)  # halfway to the mean
    drawn, shrunk = score(noisy, image, brain, lesion), score(flattened, image, brain, lesion)
    # flattening wins PSNR with the same errors: the spread falls below 1, the correlation does not move
    assert shrunk["psnr_brain"] > drawn["psnr_brain"] + 1
    assert drawn["spread_brain"] > 1 > 0.7 > shrunk["spread_brain"]
    assert shrunk["corr_brain"] == pytest.approx(drawn["corr_brain"], abs=1e-3) and drawn["corr_brain"] < 0.9
    rows = [{"dataset": "d", "case": "c", "split": "test", "task": "t1->t2", "method": m, **r}
            for m, r in (("drawn", drawn), ("shrunk", shrunk))]
    text = summary_markdown(rows)
    assert f"| {shrunk['spread_brain']:.2f} / {shrunk['corr_brain']:.2f} |" in text and "spread / corr brain" in text
    assert math.isnan(score(noisy, np.where(brain, 0.5, 0).astype(np.float32), brain, lesion)["corr_brain"])


def test_copy_nearest_picks_the_closest_contrast_that_is_given():
    image, brain, _ = _case()
    case = EvalCase("d", "c", "test", {"t1": image, "t2": 2 * image, "flair": 3 * image}, brain, None)
    prediction, uncertainty = CopyNearest()(case, Task(("t2", "t1", "flair"), "t1c"))
    np.testing.assert_array_equal(prediction, image)
    assert uncertainty is None
    np.testing.assert_array_equal(CopyNearest()(case, Task(("t1", "t2"), "flair"))[0], 2 * image)


def test_cases_come_from_the_requested_split(tiny_cache):
    cases = list(load_cases(tiny_cache, "test"))
    assert {c.dataset for c in cases} == {"glioma", "immune", "bratslike", "stroke"}
    assert all(c.split == "test" for c in cases)
    glioma = next(c for c in cases if c.dataset == "glioma")
    assert set(glioma.images) == {"t1", "t2", "t1c", "flair", "dwi", "adc"}
    assert glioma.images["t1"].shape == glioma.brain.shape and glioma.lesion.any()
    strided = next(c for c in load_cases(tiny_cache, "test", ["glioma"], slice_stride=3))
    # methods get the whole volume (a 2.5D model needs each slice's neighbours); every 3rd slice is scored
    assert strided.brain.shape == glioma.brain.shape
    assert len(range(strided.brain.shape[2])[strided.scored]) == -(-glioma.brain.shape[2] // 3)


def test_voxelwise_regression_learns_a_relation_that_exists(tiny_cache):
    regression = VoxelwiseRegression(tiny_cache)
    case = next(load_cases(tiny_cache, "test", ["glioma"]))
    task = Task(("t1", "t2"), "flair")  # FLAIR is T2 with CSF nulled: T1 tells where CSF is
    fitted = score(regression(case, task)[0], case.images["flair"], case.brain, case.lesion)
    copied = score(CopyNearest()(case, task)[0], case.images["flair"], case.brain, case.lesion)
    assert fitted["psnr_brain"] > copied["psnr_brain"] + 3
    # the fit is on the training split, once per dataset and task
    assert list(regression._fits) == [("glioma", task)]
    with pytest.raises(ValueError, match="no train case of stroke"):
        regression.fit("stroke", Task(("t1",), "t1c"))


def test_evaluate_writes_scores_summary_and_figures(tiny_cache, tmp_path):
    methods = [PipelineMethod(tiny_gan(), "tiny-gan"), CopyNearest()]
    tasks = [Task.parse("t1->t1c"), Task.parse("flair->adc")]
    rows = evaluate(tiny_cache, methods, tmp_path / "eval", tasks=tasks, progress=False)
    with open(tmp_path / "eval" / "scores.csv") as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows) > 0
    # glioma has both tasks, stroke only flair->adc, immune may lack t1c; every case/task has both methods
    keys = {(r["case"], r["task"]) for r in written}
    assert all(sum(r["case"] == c and r["task"] == t for r in written) == 2 for c, t in keys)
    assert {r["dataset"] for r in written if r["task"] == "flair->adc"} >= {"glioma", "stroke"}
    summary = (tmp_path / "eval" / "summary.md").read_text()
    assert "Normalisation" in summary and "| glioma | t1->t1c | tiny-gan |" in summary
    # the overview: per method, the mean over each dataset's case-tasks, then over all of them
    copy_rows = [r for r in written if r["method"] == "copy-nearest"]
    glioma = [r for r in copy_rows if r["dataset"] == "glioma"]
    overview = next(line for line in summary.splitlines() if line.startswith("| copy-nearest |")).split(" | ")
    datasets = next(line for line in summary.splitlines() if line.startswith("| method |")).split(" | ")
    cell = overview[datasets.index("glioma")]
    assert cell == (f"{np.mean([float(r['psnr_brain']) for r in glioma]):.2f} / "
                    f"{np.mean([float(r['ssim_brain']) for r in glioma]):.3f} ({len(glioma)})")
    assert overview[-1].rstrip(" |").endswith(f"({len(copy_rows)})")
    assert sorted(p.name for p in (tmp_path / "eval" / "figures").iterdir()) == ["flair_to_adc.png", "t1_to_t1c.png"]
    # the lesion is outlined in red on the real image (the phantom cases have lesions); without it the figure is grey
    figure = np.asarray(Image.open(tmp_path / "eval" / "figures" / "t1_to_t1c.png").convert("RGB")).astype(int)
    assert ((figure[..., 0] > 200) & (figure[..., 1] < 120)).sum() > 10
    with pytest.raises(FileExistsError):
        evaluate(tiny_cache, methods, tmp_path / "eval", tasks=tasks, progress=False)


def test_outlined_marks_the_pixels_just_outside_the_mask_and_leaves_the_mask_as_it_was():
    from mmdiff.viz import outlined

    rgb = np.full((7, 7, 3), 90, dtype=np.uint8)
    rgb[3, 3] = 200
    mask = np.zeros((7, 7), bool)
    mask[3, 3] = True  # a one-voxel lesion
    out = outlined(rgb, mask)
    red = (out == (255, 48, 48)).all(-1)
    assert red.sum() == 4 and red[2, 3] and red[4, 3] and red[3, 2] and red[3, 4]
    assert (out[3, 3] == 200).all() and (out[~red & ~mask] == 90).all() and (rgb == 90).sum() == 48 * 3


def test_pipelines_whose_folders_share_a_name_are_told_apart_and_one_given_twice_is_refused(tiny_cache, tmp_path,
                                                                                           capsys):
    """`pipelines/mmdiff-gan` beside `runs/new/mmdiff-gan`: each keeps its own rows (named by the last two
    parts of its path), never one merged method; the same folder twice, or two methods of one name
    through the API, is an error before anything is scored."""
    gan = tiny_gan()
    for parent in ("old", "new"):
        gan.save_pretrained(tmp_path / parent / "mmdiff-gan")
    common = ["--data", str(tiny_cache), "--datasets", "glioma", "--tasks", "t1->t1c", "--baselines", "--quiet"]
    assert main(["evaluate", "--pipeline", str(tmp_path / "old" / "mmdiff-gan"), str(tmp_path / "new" / "mmdiff-gan"),
                 "--out", str(tmp_path / "e"), *common]) == 0
    with open(tmp_path / "e" / "scores.csv") as f:
        written = list(csv.DictReader(f))
    assert {r["method"] for r in written} == {"old/mmdiff-gan", "new/mmdiff-gan"}
    assert sum(r["method"] == "old/mmdiff-gan" for r in written) == sum(r["method"] == "new/mmdiff-gan" for r in written)
    capsys.readouterr()
    assert main(["evaluate", "--pipeline", str(tmp_path / "old" / "mmdiff-gan"), str(tmp_path / "old" / "mmdiff-gan"),
                 "--out", str(tmp_path / "twice"), *common]) == 2
    assert "more than once (old/mmdiff-gan)" in capsys.readouterr().err and not (tmp_path / "twice").exists()
    with pytest.raises(ValueError, match="two methods are named"):
        evaluate(tiny_cache, [CopyNearest(), CopyNearest()], tmp_path / "api", progress=False)


def test_evaluate_command_with_baselines(tiny_cache, tmp_path, capsys):
    code = main(["evaluate", "--data", str(tiny_cache), "--datasets", "glioma", "--tasks", "t1+t2+flair->t1c",
                 "--out", str(tmp_path / "e"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "copy-nearest" in printed and "voxel-regression" in printed
    assert main(["evaluate", "--data", str(tiny_cache), "--baselines", "--out", str(tmp_path / "f")]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_evaluate_command_compares_schedulers_and_steps(tiny_cache, tmp_path, capsys):
    pipe = tiny_ldm()
    pipe.register_to_config(point_estimate="sample_mean")  # the posterior mean needs only the (shared) first step
    pipe.save_pretrained(tmp_path / "ldm")
    code = main(["evaluate", "--data", str(tiny_cache), "--datasets", "glioma", "--tasks", "t1->t1c",
                 "--pipeline", str(tmp_path / "ldm"), "--steps", "3", "1", "--scheduler", "ddim", "dpm++",
                 "--baselines", "--slice-stride", "4", "--out", str(tmp_path / "e"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    with open(tmp_path / "e" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    by_method = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(float(row["psnr_brain"]))
    assert sorted(by_method) == ["ldm (ddim, 1 steps)", "ldm (ddim, 3 steps)", "ldm (dpm++, 1 steps)",
                                 "ldm (dpm++, 3 steps)"]
    # really another sampler (at 2 steps DPM-Solver++'s first-order start and final step equal DDIM's)
    assert by_method["ldm (ddim, 3 steps)"] != by_method["ldm (dpm++, 3 steps)"]
    summary = (tmp_path / "e" / "summary.md").read_text()
    assert summary.index("(ddim, 3 steps)") < summary.index("(ddim, 1 steps)") < summary.index("(dpm++, 3 steps)")


def test_evaluate_command_scores_a_gan_plain_and_flip_averaged(tiny_cache, tmp_path, capsys):
    tiny_gan().save_pretrained(tmp_path / "gan")
    tiny_ldm().save_pretrained(tmp_path / "ldm")
    code = main(["evaluate", "--data", str(tiny_cache), "--datasets", "glioma", "--tasks", "t1->t1c",
                 "--pipeline", str(tmp_path / "gan"), str(tmp_path / "ldm"), "--flip-average", "--baselines",
                 "--steps", "1", "--slice-stride", "4", "--out", str(tmp_path / "e"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    with open(tmp_path / "e" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    by_method = {row["method"]: float(row["psnr_brain"]) for row in rows}
    assert sorted(by_method) == ["gan", "gan (flip-averaged)", "ldm"]  # the diffusion engine is scored once
    assert by_method["gan"] != by_method["gan (flip-averaged)"]


def test_source_gamma_changes_the_sources_contrast_and_nothing_else(tiny_cache):
    case = next(load_cases(tiny_cache, "test", ["glioma"]))
    assert with_source_gamma(case, ("t1",), 1.0) is case
    changed = with_source_gamma(case, ("t1", "flair"), 0.5)
    np.testing.assert_allclose(changed.images["t1"], np.sqrt(case.images["t1"]), rtol=1e-6)
    np.testing.assert_allclose(changed.images["flair"], np.sqrt(case.images["flair"]), rtol=1e-6)
    assert changed.images["t1c"] is case.images["t1c"] and changed.brain is case.brain
    # the order of tissues is kept, their contrast is not: grey is brighter against white and CSF
    inside = case.images["t1"][case.brain]
    assert np.corrcoef(inside, changed.images["t1"][case.brain])[0, 1] > 0.9
    assert not np.allclose(changed.images["t1"][case.brain] / inside.mean(),
                           inside / inside.mean(), atol=0.05)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="source gamma must be positive"):
            with_source_gamma(case, ("t1",), bad)


class _RecordingPipeline:
    """Stands in for a GAN pipeline: records the dataset it is given and returns zeros."""

    engine, modalities, context_slices = "gan", ("t1", "t1c"), 0

    def __init__(self):
        self.datasets = []

    def __call__(self, images, dataset=None, targets=(), brain_mask=None, **_):
        self.datasets.append(dataset)
        shape = brain_mask.shape
        return type("Output", (), {"images": {t: np.zeros(shape, np.float32) for t in targets}, "uncertainty": None})


def test_an_unseen_site_gets_no_dataset(tiny_cache):
    case = next(load_cases(tiny_cache, "test", ["glioma"], slice_stride=4))
    pipe = _RecordingPipeline()
    task = Task(("t1",), "t1c")
    PipelineMethod(pipe, "own")(case, task)
    PipelineMethod(pipe, "unseen", unseen_site=True)(case, task)
    assert pipe.datasets == ["glioma", None]


def test_evaluate_command_scores_a_pipeline_at_an_unseen_site_and_with_other_source_contrasts(
        tiny_cache, tmp_path, capsys):
    pipe = tiny_gan()
    pipe.generator.register_to_config(dataset_names=["glioma", "ixi"])  # a model that knows the cases' site
    pipe.save_pretrained(tmp_path / "gan")
    args = ["evaluate", "--data", str(tiny_cache), "--datasets", "glioma", "--tasks", "t1->t1c",
            "--pipeline", str(tmp_path / "gan"), "--unseen-site", "--baselines", "copy-nearest",
            "--slice-stride", "4", "--quiet"]
    code = main([*args, "--source-gamma", "0.5", "--out", str(tmp_path / "e")])
    assert code == 0, capsys.readouterr().err
    with open(tmp_path / "e" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    by_method = {row["method"]: row for row in rows}
    assert sorted(by_method) == ["copy-nearest", "gan", "gan (unseen site)"]
    assert by_method["gan"]["psnr_brain"] != by_method["gan (unseen site)"]["psnr_brain"]
    # every method got the changed sources and was scored against the real target
    case = next(load_cases(tiny_cache, "test", ["glioma"], slice_stride=4))
    k = case.scored
    expected = score((np.sqrt(case.images["t1"]) * case.brain)[..., k], case.images["t1c"][..., k],
                     case.brain[..., k], case.lesion[..., k], case.labels[..., k])
    assert float(by_method["copy-nearest"]["psnr_brain"]) == pytest.approx(expected["psnr_brain"], rel=1e-5)
    as_is = score((case.images["t1"] * case.brain)[..., k], case.images["t1c"][..., k], case.brain[..., k],
                  case.lesion[..., k], case.labels[..., k])
    assert abs(as_is["psnr_brain"] - expected["psnr_brain"]) > 0.1
    assert "raised to the power 0.5" in (tmp_path / "e" / "summary.md").read_text()
    assert main([*args, "--source-gamma", "0", "--out", str(tmp_path / "f")]) == 2
    assert "source gamma must be positive" in capsys.readouterr().err


def test_uncertainty_scores_coverage_and_rank_correlation():
    rng = np.random.default_rng(0)
    brain = np.zeros((20, 20, 4), bool)
    brain[2:18, 2:18] = True
    reference = rng.uniform(0, 1, brain.shape).astype(np.float32)
    spread = rng.uniform(0.01, 0.2, brain.shape).astype(np.float32)
    prediction = reference + rng.normal(0, 1, brain.shape).astype(np.float32) * spread  # errors ~ N(0, spread^2)
    scores = uncertainty_scores(prediction, reference, 1.645 * spread, brain)
    assert scores["coverage"] == pytest.approx(0.90, abs=0.03)
    assert scores["spearman_uncertainty"] > 0.3
    shuffled = uncertainty_scores(prediction, reference, rng.permutation(spread.ravel()).reshape(spread.shape), brain)
    assert abs(shuffled["spearman_uncertainty"]) < 0.1  # an uncertainty that says nothing about where the errors are
    assert all(np.isnan(v) for v in uncertainty_scores(prediction, reference, None, brain).values())
    assert np.isnan(scores["coverage_lesion"])  # no lesion mask
    lesion = np.zeros_like(brain)
    lesion[5:10, 5:10] = True
    worse = prediction.copy()
    worse[lesion] = reference[lesion] + 3 * (prediction - reference)[lesion]  # errors 3x the stated spread there
    with_lesion = uncertainty_scores(worse, reference, 1.645 * spread, brain, lesion)
    assert with_lesion["coverage_lesion"] == pytest.approx(0.41, abs=0.08)  # P(|z| <= 1.645 / 3)
    assert with_lesion["coverage"] > 0.8  # the brain's coverage hides it


def test_evaluate_reports_the_uncertainty_of_sampling_pipelines(tiny_cache, tmp_path, capsys):
    pipe = tiny_ldm()
    pipe.register_to_config(interval_scale=3.0)
    pipe.save_pretrained(tmp_path / "ldm")
    assert main(["evaluate", "--data", str(tiny_cache), "--datasets", "glioma", "--tasks", "t1->t1c",
                 "--pipeline", str(tmp_path / "ldm"), "--steps", "2", "--samples", "3", "--slice-stride", "4",
                 "--out", str(tmp_path / "e"), "--quiet"]) == 0, capsys.readouterr().err
    with open(tmp_path / "e" / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    ldm = [r for r in rows if r["method"] == "ldm"]
    copy = [r for r in rows if r["method"] == "copy-nearest"]
    assert ldm and all(0 < float(r["coverage"]) <= 1 for r in ldm)
    assert copy and all(r["coverage"] == "nan" for r in copy)
    summary = (tmp_path / "e" / "summary.md").read_text()
    assert "Spearman(uncertainty, abs error)" in summary and "| glioma | t1->t1c | ldm |" in summary.split("Uncertainty")[1]


def test_evaluate_data_by_config_name_builds_that_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # data-tiny's cache lives under ~/.cache
    code = main(["evaluate", "--data", "tiny", "--datasets", "glioma", "--tasks", "t1->t1c", "--slice-stride", "4",
                 "--out", str(tmp_path / "e"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / ".cache" / "mmdiff" / "phantom-tiny" / "index.json").exists()
    assert "copy-nearest" in (tmp_path / "e" / "summary.md").read_text()
    assert main(["evaluate", "--data", "nonesuch", "--out", str(tmp_path / "f")]) == 2
    assert "neither a prepared cache folder nor a data config" in capsys.readouterr().err


def test_baseline_wins_counts_pairs_where_a_method_beats_both_baselines_on_both_metrics():
    """The issue's bar, per (dataset, task): mean brain PSNR and SSIM above both baselines'; a tie or
    one metric behind is not a win; the summary says it in a line per method."""
    from mmdiff.evaluation.report import baseline_wins, summary_markdown

    def row(dataset, task, method, psnr, ssim, case="a"):
        return {"dataset": dataset, "case": case, "split": "test", "task": task, "method": method,
                "psnr_brain": psnr, "ssim_brain": ssim}

    rows = [row("x", "t1->t2", "m", 20, 0.8), row("x", "t1->t2", "copy-nearest", 15, 0.5),
            row("x", "t1->t2", "voxel-regression", 19, 0.7),
            row("x", "t2->flair", "m", 20, 0.6), row("x", "t2->flair", "copy-nearest", 15, 0.5),
            row("x", "t2->flair", "voxel-regression", 19, 0.7),  # SSIM behind the regression
            row("y", "t1->t2", "m", 20, 0.8, "b"), row("y", "t1->t2", "m", 18, 0.8, "c"),  # mean 19: a tie
            row("y", "t1->t2", "copy-nearest", 15, 0.5), row("y", "t1->t2", "voxel-regression", 19, 0.7)]
    assert baseline_wins(rows) == {"m": (1, 3, ["x t2->flair", "y t1->t2"])}
    assert "m beats both baselines on brain PSNR and SSIM in 1 of 3 (dataset, task) pairs" in summary_markdown(rows)
    assert baseline_wins([r for r in rows if r["method"] != "voxel-regression"]) == {}  # without both: no claim
