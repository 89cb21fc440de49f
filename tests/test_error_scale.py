"""The learned error scale: its loss, that it learns where the errors are, and how the diffusion
pipeline states and calibrates it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from test_ldm import square_volume
from test_pipelines import DATASETS, inputs, tiny_ldm

from mmdiff.models.error_scale import LOG_SCALE_MIN, ErrorScaleNet, laplace_nll
from mmdiff.pipelines import MMDiffPipeline
from mmdiff.pipelines.ldm import calibrate, combined_spread


def tiny_error_model(modalities=("t1", "t2", "t1c", "flair", "dwi", "adc"), seed: int = 0) -> ErrorScaleNet:
    torch.manual_seed(seed)
    return ErrorScaleNet(modalities=modalities, num_datasets=2, dataset_names=DATASETS, channels=8, num_layers=2)


def test_laplace_nll_is_least_at_the_mean_absolute_error_and_reads_only_scored_pairs():
    """NLL = |e| / b + log b is minimised at b = mean |e|: the scale it learns is the expected error."""
    error = torch.distributions.Laplace(0.0, 0.07).sample((2, 2, 16, 16), )
    weight = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    levels = torch.linspace(-5, 0, 501)
    losses = [float(laplace_nll(torch.full_like(error, float(s)), error, weight)) for s in levels]
    best = float(levels[int(np.argmin(losses))])
    assert math.exp(best) == pytest.approx(float(error[:, 0].abs().mean()), rel=0.02)
    unscored = error.clone()
    unscored[:, 1] = 100.0  # the unscored modality's values never enter
    assert float(laplace_nll(torch.zeros_like(error), unscored, weight)) == float(laplace_nll(torch.zeros_like(error), error, weight))
    brain = torch.zeros(2, 16, 16)
    brain[:, :8] = 1
    outside = error.clone()
    outside[..., 8:, :] = 50.0  # outside the pixel weight: ignored too
    assert float(laplace_nll(torch.zeros_like(error), outside, weight, brain)) == pytest.approx(
        float(laplace_nll(torch.zeros_like(error), error, weight, brain)))


def test_error_model_starts_constant_and_learns_where_the_errors_are():
    """Untrained: one constant scale everywhere (the zero-initialised output layer). Trained on errors
    whose size depends on what it sees (large on bright source tissue, small elsewhere), it ranks the
    voxels by their error and its scale approaches the mean |error| of each kind of voxel."""
    torch.manual_seed(0)
    model = ErrorScaleNet(modalities=("t1", "t2"), num_datasets=1, dataset_names=["a"], channels=8, num_layers=2,
                          init_scale=0.05)
    blobs = (torch.rand(64, 1, 8, 8) > 0.6).float()
    source = torch.nn.functional.interpolate(blobs, size=(32, 32), mode="nearest")  # bright patches
    condition = torch.cat([source * 2 - 1, torch.zeros_like(source)], dim=1)  # t1 a source, t2 its mu
    sources = torch.tensor([True, False])
    untrained = model(condition[:2], sources, 0)
    assert torch.allclose(untrained, torch.full_like(untrained, math.log(0.05)))
    true_scale = 0.01 + 0.2 * source[:, 0]  # [N, H, W]
    error = torch.distributions.Laplace(torch.zeros_like(true_scale), true_scale).sample()
    errors = torch.stack([torch.zeros_like(error), error], dim=1)
    weight = torch.tensor([[0.0, 1.0]]).expand(len(source), 2)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(150):
        batch = torch.randint(0, 48, (16,))
        loss = laplace_nll(model(condition[batch], sources, 0), errors[batch], weight[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        scale = model(condition[48:], sources, 0)[:, 1].exp()
    held_out = error[48:].abs()
    assert spearmanr(scale.flatten(), held_out.flatten()).statistic > 0.5
    bright = source[48:, 0] > 0
    assert float(scale[bright].mean()) == pytest.approx(0.2, rel=0.3)
    assert float(scale[~bright].mean()) < 0.05
    with torch.no_grad():
        assert float(model(condition[:1] * 0 - 1, sources, 0).min()) >= LOG_SCALE_MIN


def test_dataset_modulated_error_model_learns_a_site_specific_failure():
    """A predictor that misses bright lesions on one site only: with ``use_pfm`` the error model learns
    large scales on bright tissue for that site and not for the other; without it the dataset only
    shifts ``log b`` by a constant, so the bright / dark ratio is the same on both sites. A zero-initialised
    modulation leaves a model that had none unchanged (old weights load and start as they were)."""
    torch.manual_seed(0)
    blobs = (torch.rand(64, 1, 8, 8) > 0.6).float()
    source = torch.nn.functional.interpolate(blobs, size=(32, 32), mode="nearest")
    condition = torch.cat([source * 2 - 1, torch.zeros_like(source)], dim=1)
    sources = torch.tensor([True, False])
    site = torch.arange(64) % 2  # site 0 misses the bright tissue, site 1 does not
    true_scale = 0.01 + 0.2 * source[:, 0] * (site == 0).float()[:, None, None]
    error = torch.distributions.Laplace(torch.zeros_like(true_scale), true_scale).sample()
    errors = torch.stack([torch.zeros_like(error), error], dim=1)
    weight = torch.tensor([[0.0, 1.0]]).expand(16, 2)
    ratios = {}
    for use_pfm in (False, True):
        torch.manual_seed(1)
        model = ErrorScaleNet(modalities=("t1", "t2"), num_datasets=2, dataset_names=["a", "b"], channels=8,
                              num_layers=2, use_pfm=use_pfm)
        if use_pfm:
            plain = ErrorScaleNet(modalities=("t1", "t2"), num_datasets=2, dataset_names=["a", "b"], channels=8,
                                  num_layers=2)
            torch.nn.init.normal_(plain.conv_out.weight, std=0.1)
            model.load_state_dict(plain.state_dict(), strict=False)
            torch.testing.assert_close(model(condition[:4], sources, site[:4]), plain(condition[:4], sources, site[:4]))
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(200):
            batch = torch.randint(0, 48, (16,))
            loss = laplace_nll(model(condition[batch], sources, site[batch]), errors[batch], weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        bright = source[48:, 0] > 0
        ratios[use_pfm] = []
        for k in (0, 1):  # the same held-out images, stated for each site
            with torch.no_grad():
                scale = model(condition[48:], sources, k)[:, 1].exp()
            ratios[use_pfm].append(float(scale[bright].mean() / scale[~bright].mean()))
    assert ratios[False][0] == pytest.approx(ratios[False][1], rel=1e-4)  # a constant offset per site only
    assert ratios[True][0] > 4 and ratios[True][1] < 2


def test_a_pipeline_with_an_error_model_states_an_uncertainty_even_from_one_sample(tmp_path):
    """The uncertainty is sqrt(std^2 + 2 b^2) times the calibrated scale: with K = 1 it is sqrt 2 b;
    the image is the same with or without the error model; it is saved and loaded as a component."""
    base = tiny_ldm()
    volume = square_volume(2)
    # float32 whatever the CPU: "auto" would run bf16 autocast on one with native bf16, 0.4 % off the formula
    kwargs = dict(dataset="brats", num_inference_steps=2, targets=["t1c", "t2"], precision="float32")
    plain = base(inputs(volume), num_samples=1, generator=torch.Generator().manual_seed(0), **kwargs)
    assert plain.uncertainty is None  # one sample and no error model: nothing to state
    model = tiny_error_model()
    pipe = MMDiffPipeline(base.vae, base.unet, base.scheduler, base.predictor, error_model=model, interval_scale=2.0)
    pipe.set_progress_bar_config(disable=True)
    one = pipe(inputs(volume), num_samples=1, generator=torch.Generator().manual_seed(0), **kwargs)
    for name in plain.images:
        np.testing.assert_array_equal(one.images[name], plain.images[name])
        inside = one.mask
        # untrained: b = 0.05 in [-1, 1] units = 0.025 in [0, 1]; times sqrt 2 and the scale 2
        np.testing.assert_allclose(one.uncertainty[name][inside], 2.0 * math.sqrt(2) * 0.025, rtol=1e-5)
    two = pipe(inputs(volume), num_samples=2, generator=torch.Generator().manual_seed(0), **kwargs)
    samples_only = base(inputs(volume), num_samples=2, generator=torch.Generator().manual_seed(0), **kwargs)
    for name in two.images:
        std = samples_only.uncertainty[name]  # the raw samples' spread (scale 1), [0, 1] units
        expected = 2.0 * np.sqrt(std ** 2 + 2 * 0.025 ** 2)
        np.testing.assert_allclose(two.uncertainty[name][two.mask], expected[two.mask], rtol=1e-4)
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = MMDiffPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.error_model, ErrorScaleNet)
    again = loaded(inputs(volume), num_samples=1, generator=torch.Generator().manual_seed(0), **kwargs)
    for name in one.images:
        np.testing.assert_allclose(again.uncertainty[name], one.uncertainty[name], rtol=1e-6)
    base.save_pretrained(tmp_path / "old")  # a pipeline without one loads as before
    assert MMDiffPipeline.from_pretrained(tmp_path / "old").error_model is None


def test_calibration_fits_the_combined_spread_and_reports_how_it_ranks_the_errors():
    """With an error model the calibrated scale covers the stated fraction for the combined spread
    (here with one sample: the error model alone), and the calibration records the spread's rank
    correlation with the error."""
    pipe = tiny_ldm()
    model = tiny_error_model()
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)  # a "trained" model: the scale varies
    rng = np.random.default_rng(0)
    slices = []
    for k in range(3):
        images = torch.from_numpy(rng.uniform(0.1, 0.9, (6, 16, 16)).astype(np.float32))
        sources = torch.tensor([True, False, False, True, False, False])
        targets = ~sources
        slices.append((images, sources, targets, 0, torch.ones(16, 16, dtype=torch.bool), None))
    fitted = calibrate(pipe.predictor, pipe.vae, pipe.unet, pipe.scheduler, slices, num_samples=1,
                       num_inference_steps=2, coverage=0.8, fit_weight=False, error_model=model)
    assert fitted.interval_scale is not None and fitted.interval_scale > 0  # one sample, yet a spread to scale
    assert fitted.spearman is not None and -1 <= fitted.spearman <= 1
    assert fitted.group_voxels is None and set(fitted.interval_scales) <= set(pipe.modalities)  # groups are opt-in
    grouped = calibrate(pipe.predictor, pipe.vae, pipe.unet, pipe.scheduler, slices, num_samples=1,
                        num_inference_steps=2, coverage=0.8, fit_weight=False, error_model=model, groups=True)
    names = pipe.unet.config.dataset_names
    # three slices of 256 voxels, two sources: every target's finer groups are counted (too few voxels for scales)
    assert grouped.group_voxels[f"t2 on {names[0]} from 2+ sources"] == 3 * 256
    assert grouped.group_voxels["t2 from 2+ sources"] == 3 * 256
    without = calibrate(pipe.predictor, pipe.vae, pipe.unet, pipe.scheduler, slices, num_samples=1,
                        num_inference_steps=2, coverage=0.8, fit_weight=False)
    assert without.interval_scale is None and without.spearman is None and without.spearman_samples is None
    two = calibrate(pipe.predictor, pipe.vae, pipe.unet, pipe.scheduler, slices, num_samples=2,
                    num_inference_steps=2, coverage=0.8, fit_weight=False, error_model=model)
    assert -1 <= two.spearman <= 1 and -1 <= two.spearman_samples <= 1 and two.spearman != two.spearman_samples
    constant = calibrate(pipe.predictor, pipe.vae, pipe.unet, pipe.scheduler, slices, num_samples=1,
                         num_inference_steps=2, coverage=0.8, fit_weight=False, error_model=tiny_error_model())
    assert np.isnan(constant.spearman)  # an untrained model states one scale: it ranks nothing
    assert combined_spread(None, None) is None
    std, scale = torch.tensor([3.0]), torch.tensor([2.0])
    assert float(combined_spread(std, scale)) == pytest.approx(math.sqrt(9 + 8))
    assert float(combined_spread(std, None)) == 3.0 and float(combined_spread(None, scale)) == pytest.approx(math.sqrt(8))


def test_error_model_alone_learns_with_lesion_pixels_weighted(tmp_path, monkeypatch):
    """``model.train_unet: false`` refits the error model alone (the UNet is untouched), and
    ``model.error_model.lesion_weight`` weights lesion pixels in its likelihood (brain pixels 1, lesion
    1 + w, background 0)."""
    from test_generator_lean import StepAccelerator
    from test_pipelines import tiny_gan

    from mmdiff.training import load_config
    from mmdiff.training import stages
    from mmdiff.training.config import ConfigError

    tiny_gan().generator.save_pretrained(tmp_path / "generator")
    modalities = ["t1", "t2", "t1c", "flair", "dwi", "adc"]
    config = load_config("ldm-tiny", ["model.train_unet=false", "model.error_model.lesion_weight=9"])
    stage = stages.LDMStage(config, DATASETS, modalities, "cpu", predictor_path=tmp_path / "generator")
    seen = []
    original = stages.laplace_nll
    monkeypatch.setattr(stages, "laplace_nll", lambda *a: seen.append(a[3].clone()) or original(*a))
    seg = torch.zeros(2, 32, 28, dtype=torch.uint8)
    seg[:, 10:14, 8:12] = 2
    brain = torch.ones(2, 32, 28, dtype=torch.bool)
    brain[:, :2] = False
    batch = {"images": torch.rand(2, 6, 32, 28, generator=torch.Generator().manual_seed(0)),
             "available": torch.ones(2, 6, dtype=torch.bool), "dataset_id": torch.zeros(2, dtype=torch.long),
             "seg": seg, "brain_mask": brain}

    unet_before = [p.detach().clone() for p in stage.models["unet"].parameters()]
    error_before = [p.detach().clone() for p in stage.models["error_model"].parameters()]
    for step in range(3):
        logs = stage.training_step(batch, StepAccelerator(), step)
    assert "loss" not in logs and math.isfinite(logs["error_nll"])
    assert all(torch.equal(a, b) for a, b in zip(unet_before, stage.models["unet"].parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(error_before, stage.models["error_model"].parameters()))
    pixels = seen[0]
    assert (pixels[seg > 0] == 10).all() and (pixels[:, :2] == 0).all()
    assert (pixels[(seg == 0) & brain] == 1).all()

    with pytest.raises(ConfigError, match="error model"):
        stages.LDMStage(load_config("ldm-tiny", ["model.train_unet=false", "model.error_model=null"]), DATASETS,
                        modalities, "cpu", predictor_path=tmp_path / "generator")
