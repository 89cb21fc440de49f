"""The intensity rule is one component: prepare stores it in the cache, training exports it with the
model, and the pipelines feed every input through the model's own rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmdiff.cli import main
from mmdiff.data.cache import cache_preprocessor
from mmdiff.data.prepare import PrepareConfig
from mmdiff.data.preprocessing import MRIPreprocessor
from mmdiff.pipelines import MMGANPipeline
from mmdiff.pipelines.common import SLICE_MARGIN, brain_window, prepare_inputs
from test_pipelines import tiny_gan


def _volume_with_lesion(lesion_value: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    brain = np.zeros((24, 24, 8), bool)
    brain[3:21, 3:21] = True
    image = np.where(brain, rng.uniform(400, 600, brain.shape), 0).astype(np.float32)
    image[8:16, 8:16, 2:6] = lesion_value  # a large bright lesion: ~20 % of the brain
    return image, brain


def test_median_rule_is_not_moved_by_a_bright_lesion_the_percentile_rule_is():
    small, brain = _volume_with_lesion(600.0)
    bright, _ = _volume_with_lesion(3000.0)
    median, percentile = MRIPreprocessor("median"), MRIPreprocessor("percentile", clip_percentile=99.5)
    assert median.scale(bright, brain) / median.scale(small, brain) < 1.1
    assert percentile.scale(bright, brain) / percentile.scale(small, brain) > 4
    normal = median.normalise(bright, brain)[0][3:6, 3:6]  # normal brain sits near 1/3
    assert 0.25 < normal.mean() < 0.4
    out, top = median.normalise(bright, brain)
    assert out.max() == 1.0 and out[~brain].max() == 0 and top > 0


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="normalisation must be one of"):
        MRIPreprocessor("zscore")
    with pytest.raises(ValueError, match="clip_percentile"):
        MRIPreprocessor("percentile", clip_percentile=30)
    with pytest.raises(ValueError, match="clip_percentile"):
        PrepareConfig(normalisation="percentile", clip_percentile=120)


def test_pipeline_saves_and_loads_its_preprocessor_and_feeds_inputs_through_it(tmp_path):
    """A model trained with the 90th-percentile rule is fed the 90th-percentile rule, whatever the default."""
    pipe = tiny_gan()
    pipe.register_modules(preprocessor=MRIPreprocessor("percentile", clip_percentile=90.0))
    pipe.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "preprocessor" / "preprocessor_config.json").read_text())[
        "clip_percentile"] == 90.0
    loaded = MMGANPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.preprocessor.config.clip_percentile == 90.0

    image, brain = _volume_with_lesion(900.0)
    seen = []
    loaded.generator.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0].clone()),
                                               with_kwargs=True)
    loaded(images={"t1": image}, targets=["t2"], brain_mask=brain, batch_size=8)
    expected = prepare_inputs({"t1": image}, loaded.modalities, ["t2"], brain, loaded.downsampling,
                              preprocessor=MRIPreprocessor("percentile", clip_percentile=90.0),
                              slice_margin=SLICE_MARGIN)
    fed = (seen[0][:, 0] + 1) / 2  # the network's [-1, 1] back to [0, 1]
    torch.testing.assert_close(fed, next(expected.batches(8))[1][:, 0])
    other = prepare_inputs({"t1": image}, loaded.modalities, ["t2"], brain, loaded.downsampling,
                           preprocessor=MRIPreprocessor("median"), slice_margin=SLICE_MARGIN)
    assert not np.allclose(other.images, expected.images)


def test_pipelines_saved_without_a_preprocessor_use_the_old_rule(tmp_path):
    tiny_gan().save_pretrained(tmp_path / "old")
    index = json.loads((tmp_path / "old" / "model_index.json").read_text())
    assert index["preprocessor"] == [None, None]
    loaded = MMGANPipeline.from_pretrained(tmp_path / "old")
    assert loaded.preprocessor is None
    image, brain = _volume_with_lesion(900.0)
    legacy = prepare_inputs({"t1": image}, loaded.modalities, ["t2"], brain, 4)
    explicit = prepare_inputs({"t1": image}, loaded.modalities, ["t2"], brain, 4,
                              preprocessor=MRIPreprocessor("percentile", clip_percentile=99.5))
    np.testing.assert_array_equal(legacy.images, explicit.images)


def test_a_model_trained_on_a_percentile_cache_carries_that_rule(tmp_path, capsys):
    """prepare --normalisation percentile --clip-percentile 90 -> train -> the exported pipeline feeds 90."""
    assert main(["phantom", str(tmp_path / "ph"), "--cases", "2", "--spacing", "3", "--quiet",
                 "--cohorts", "glioma"]) == 0
    assert main(["prepare", str(tmp_path / "ph" / "manifest.csv"), "--out", str(tmp_path / "cache"),
                 "--size", "64", "--spacing", "3", "--workers", "1", "--quiet",
                 "--normalisation", "percentile", "--clip-percentile", "90"]) == 0
    assert cache_preprocessor(tmp_path / "cache").config.clip_percentile == 90.0
    assert main(["train", "--config", "gan-tiny", "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
                 f"data.cache={tmp_path / 'cache'}", "validation.every=0", "checkpoint.every=0"]) == 0
    pipe = MMGANPipeline.from_pretrained(tmp_path / "run" / "final")
    assert pipe.preprocessor.config.normalisation == "percentile"
    assert pipe.preprocessor.config.clip_percentile == 90.0


def test_brain_window_covers_the_brain_in_multiples_and_may_reach_past_the_grid():
    brain = np.zeros((30, 26, 4), bool)
    brain[2:9, 20:26, 1] = True
    (x0, x1), (y0, y1) = brain_window(brain, 8)
    assert (x1 - x0) % 8 == 0 and (y1 - y0) % 8 == 0
    assert x0 <= 2 and x1 >= 9 and y0 <= 20 and y1 >= 26
    assert y1 > 26  # past the grid's edge: zero-padded there


def test_outputs_do_not_depend_on_how_much_background_surrounds_the_brain():
    pipe = tiny_gan()
    image, brain = _volume_with_lesion(900.0)
    out = pipe(images={"t1": image}, targets=["t2"], brain_mask=brain).images["t2"]
    padded = np.pad(image, ((5, 9), (7, 3), (0, 0)))
    padded_brain = np.pad(brain, ((5, 9), (7, 3), (0, 0)))
    wide = pipe(images={"t1": padded}, targets=["t2"], brain_mask=padded_brain).images["t2"]
    np.testing.assert_allclose(wide[5:-9, 7:-3], out, atol=1e-6)
    assert wide[:5].max() == 0 and wide[-9:].max() == 0


def _head_with_small_top_slices():
    """A 40 x 40 x 6 volume whose brain narrows towards the top, like a head's."""
    brain = np.zeros((40, 40, 6), bool)
    for z, half in enumerate([14, 14, 12, 8, 4, 2]):
        brain[20 - half:20 + half, 18 - half:18 + half, z] = True
    image = np.where(brain, 500.0, 0.0).astype(np.float32)
    return image, brain


def test_per_slice_windows_hold_each_slices_brain_and_margin_in_multiples():
    image, brain = _head_with_small_top_slices()
    case = prepare_inputs({"t1": image}, ["t1", "t2"], ["t2"], brain, 8, slice_margin=2)
    (x0, _), (y0, _) = case.window
    areas = []
    for z in case.slices:
        (a0, a1), (b0, b1) = case.crops[z]
        assert (a1 - a0) % 8 == 0 and (b1 - b0) % 8 == 0
        assert 0 <= a0 < a1 <= case.images.shape[1] and 0 <= b0 < b1 <= case.images.shape[2]
        xs, ys = np.nonzero(brain[..., z])
        # the brain plus its margin, in window coordinates, unless the volume window is narrower
        assert a0 <= max(xs.min() - x0 - 2, 0) and a1 >= min(xs.max() + 1 - x0 + 2, case.images.shape[1])
        assert b0 <= max(ys.min() - y0 - 2, 0) and b1 >= min(ys.max() + 1 - y0 + 2, case.images.shape[2])
        assert a1 - a0 < xs.max() + 1 - xs.min() + 2 * 2 + 8  # and no more than its multiple needs
        areas.append((a1 - a0) * (b1 - b0))
    assert areas[-1] < areas[0] == case.images.shape[1] * case.images.shape[2]
    # batches hold slices of one size, every brain slice once
    seen = []
    for index, batch, _ in case.batches(4):
        sizes = {tuple(np.diff(case.crops[z], axis=1).ravel()) for z in index}
        assert len(sizes) == 1 and tuple(batch.shape[2:]) == sizes.pop()
        assert case.context(index, 1).shape[3:] == batch.shape[2:]
        seen += index.tolist()
    assert sorted(seen) == case.slices.tolist()
    assert case.num_batches(4) == len(list(case.batches(4)))


def test_gan_runs_small_slices_on_small_windows_with_the_brain_written_back():
    pipe = tiny_gan()  # float32 below: "auto" is bf16 on a CPU with native bf16, and these are exact checks
    image, brain = _head_with_small_top_slices()
    shapes = []
    hook = pipe.generator.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[2:])))
    try:
        out = pipe(images={"t1": image}, targets=["t2"], brain_mask=brain, precision="float32", batch_size=1).images["t2"]
    finally:
        hook.remove()
    assert len(set(shapes)) > 1 and min(a * b for a, b in shapes) < max(a * b for a, b in shapes)
    assert out[brain].min() > 0 and out[~brain].max() == 0  # every brain voxel synthesised, nothing outside
    # a slice's result does not depend on the batching or on the slices run with it
    batched = pipe(images={"t1": image}, targets=["t2"], brain_mask=brain, precision="float32", batch_size=4).images["t2"]
    np.testing.assert_allclose(batched, out, atol=1e-5)
    top = pipe(images={"t1": image}, targets=["t2"], brain_mask=brain, precision="float32", slices=[5]).images["t2"]
    np.testing.assert_allclose(top[..., 5], out[..., 5], atol=1e-5)
