"""The residual diffusion engine: wavelet latent, zero-initialised residual UNet, sampling maths,
calibration, per-row conditioning in validation, callbacks."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from test_pipelines import DATASETS, brain_slice, inputs, tiny_gan, tiny_ldm

from mmdiff.models import HaarWavelet
from mmdiff.pipelines import MMDiffPipeline
from mmdiff.pipelines.ldm import (TRAINING_SCHEDULER, ResidualFit, SmoothSliceNoise, fit_interval_scale,
                                  fit_interval_scales, point_and_spread, sample_residuals, sample_spread)
from mmdiff.training import load_config
from mmdiff.training.stages import LDMStage


def square_volume(slices: int = 3) -> np.ndarray:
    """Slices whose sides (32 x 28) are multiples of every tiny network's downsampling: no padding,
    so the GAN pipeline and the diffusion pipeline see identical canvases."""
    return np.stack([brain_slice((32, 28), shift=k) for k in range(slices)], axis=-1)


@pytest.mark.parametrize("levels", [1, 2])
def test_wavelet_round_trip_is_exact_and_orthonormal(tmp_path, levels):
    wavelet = HaarWavelet(levels=levels)
    images = torch.rand(2, 6, 32, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = wavelet.encode(images)
    assert latents.shape == (2, 6, 4 ** levels, 32 // 2 ** levels, 24 // 2 ** levels)
    torch.testing.assert_close(wavelet.decode(latents), images, rtol=0, atol=1e-6)
    torch.testing.assert_close(latents.square().sum(), images.square().sum())  # orthonormal: energy kept
    # the LL band is the (scaled) local mean: a constant image has nothing in the detail bands
    flat = wavelet.encode(torch.full((1, 8, 8), 0.5))
    assert torch.all(flat[:, 1:] == 0) and torch.allclose(flat[:, 0], torch.full_like(flat[:, 0], 0.5 * 2 ** levels))
    wavelet.save_pretrained(tmp_path)
    loaded = HaarWavelet.from_pretrained(tmp_path)
    assert loaded.config.levels == levels
    torch.testing.assert_close(loaded.encode(images), latents, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not divisible"):
        wavelet.encode(torch.zeros(1, 30, 31))
    with pytest.raises(ValueError, match="levels must be 1 or 2"):
        HaarWavelet(levels=3)


def test_untrained_residual_unet_returns_mu_exactly():
    """A fresh UNet (zero-initialised output) adds nothing: every sample, the point estimate and the
    GAN pipeline over the same predictor agree bit for bit, and the spread is zero."""
    pipe, gan = tiny_ldm(trained=False), tiny_gan()
    assert torch.count_nonzero(pipe.unet.conv_out.weight) == 0
    volume = square_volume()
    out = pipe(inputs(volume), dataset="brats", num_inference_steps=5, num_samples=3, return_samples=True,
               generator=torch.Generator().manual_seed(0))
    reference = gan(inputs(volume), dataset="brats")
    for name, image in reference.images.items():
        np.testing.assert_array_equal(out.images[name], image)
        assert np.all(out.uncertainty[name] == 0)
        for sample in out.samples[name]:
            np.testing.assert_array_equal(sample, image)
    trained = tiny_ldm(trained=True)(inputs(volume), dataset="brats", num_inference_steps=5, num_samples=1,
                                     generator=torch.Generator().manual_seed(0))
    assert not np.array_equal(trained.images["t2"], reference.images["t2"])  # the residual does reach the output


@pytest.mark.parametrize("engine", ["ldm", "gan"])
def test_bfloat16_precision_runs_the_networks_in_bf16_close_to_float32(engine):
    """``precision="bfloat16"`` changes the output (the networks did run in bf16) by little; float32
    is what it always was; ``"auto"`` is bf16 only on a CPU with native bf16; a bad name is refused."""
    from mmdiff.pipelines.precision import native_bf16, resolve_precision

    pipe = tiny_ldm(trained=True) if engine == "ldm" else tiny_gan()
    volume = square_volume()
    kwargs = {"num_inference_steps": 3, "num_samples": 2} if engine == "ldm" else {}

    def run(precision):
        seed = {"generator": torch.Generator().manual_seed(0)} if engine == "ldm" else {}
        return pipe(inputs(volume), dataset="brats", precision=precision, **kwargs, **seed)

    full, half = run("float32"), run("bfloat16")
    for name, image in full.images.items():
        assert not np.array_equal(half.images[name], image)
        np.testing.assert_allclose(half.images[name], image, atol=0.05)
        assert np.abs(half.images[name] - image).mean() < 0.01
        np.testing.assert_array_equal(run("float32").images[name], image)
    auto = run("auto")
    expected = half if native_bf16("cpu") else full
    for name, image in expected.images.items():
        np.testing.assert_array_equal(auto.images[name], image)
    assert resolve_precision("auto", "cuda") == "float32"
    with pytest.raises(ValueError, match="precision must be one of"):
        run("half")


class GaussianOracle(torch.nn.Module):
    """The exact clean-sample denoiser when every scaled residual latent is N(mean, std^2) independently:
    E[x0 | x_t] = mean + sqrt(a) std^2 / (a std^2 + 1 - a) * (x_t - sqrt(a) mean), a = alphas_cumprod[t]."""

    def __init__(self, scheduler, mean: torch.Tensor, std: float, residual_scale: float):
        super().__init__()
        self.alphas = scheduler.alphas_cumprod
        self.mean, self.std = mean, std
        self.config = SimpleNamespace(residual_scale=residual_scale)
        self.dtype = torch.float32

    def forward(self, noisy, t, condition, sources, dataset_id):
        a = self.alphas[t.long()].reshape(-1, 1, 1, 1, 1).to(noisy.dtype)
        gain = a.sqrt() * self.std**2 / (a * self.std**2 + 1 - a)
        return SimpleNamespace(sample=self.mean + gain * (noisy - a.sqrt() * self.mean))


def test_sample_mean_converges_to_mu_plus_expected_residual():
    """With an exact denoiser for a known residual distribution, the pipeline's maths (``sample_residuals``)
    gives samples whose mean tends to mu + E[residual] (error ~ 1/sqrt(K)) and whose spread is the
    residual's std (at 30 steps; few-step deterministic samplers shrink the spread, about 18% at 10
    DPM-Solver++ steps here, which the calibrated interval scale absorbs)."""
    torch.manual_seed(0)
    predictor, wavelet = tiny_gan().generator, HaarWavelet(levels=1)
    scheduler = DPMSolverMultistepScheduler.from_config(TRAINING_SCHEDULER)
    images = torch.rand(2, 6, 16, 16) * 2 - 1
    sources = torch.tensor([True, False, False, True, False, False])
    expected = torch.sin(torch.arange(16.0))[None, None, None] * 0.2 * torch.ones(2, 6, 16, 16)  # E[residual]
    scale, std = 2.0, 0.5  # scaled latents ~ N(scale * latent(expected), std^2)
    oracle = GaussianOracle(scheduler, wavelet.encode(expected) * scale, std, scale)
    errors, posterior_errors, target = {}, {}, ~sources
    for k in (4, 64):
        mu, residuals, posterior = sample_residuals(predictor, wavelet, oracle, scheduler, images, sources, 0, k, 30,
                                                    torch.Generator().manual_seed(k))
        point, spread = point_and_spread(mu, residuals, posterior, "sample_mean")
        assert torch.all(residuals[:, :, sources] == 0)  # sources are not resampled
        errors[k] = (point - mu - expected)[:, target].square().mean().sqrt().item()
        posterior_point, _ = point_and_spread(mu, residuals, posterior, "posterior_mean")
        posterior_errors[k] = (posterior_point - mu - expected)[:, target].square().mean().sqrt().item()
    assert spread[:, target].mean().item() == pytest.approx(std / scale, rel=0.15)  # K = 64
    expected_rms = std / scale / np.sqrt(64)
    assert errors[64] == pytest.approx(expected_rms, rel=0.3)
    assert errors[64] < errors[4] / 2.5  # 1 / sqrt(K): 4x fewer samples, 2x the error
    # the first-step clean prediction estimates E[residual] almost without sampling noise: at K = 4 it
    # beats the mean of 64 samples
    assert posterior_errors[4] < errors[64] / 2
    with pytest.raises(ValueError, match="point_estimate"):
        point_and_spread(mu, residuals, posterior, "median")


def test_interval_scale_calibrates_coverage():
    rng = np.random.default_rng(0)
    spread = rng.uniform(0.5, 2.0, 20000)
    errors = rng.normal(0, 1.7 * spread)  # the raw spread underestimates the error 1.7 times
    scale = fit_interval_scale(errors, spread, 0.9)
    assert scale == pytest.approx(1.7 * 1.645, rel=0.05)
    fresh_spread = rng.uniform(0.5, 2.0, 20000)
    fresh = rng.normal(0, 1.7 * fresh_spread)
    assert np.mean(np.abs(fresh) <= scale * fresh_spread) == pytest.approx(0.9, abs=0.01)
    with pytest.raises(ValueError, match="coverage"):
        fit_interval_scale(errors, spread, 1.0)


def test_interval_scales_per_target_cover_each_target():
    """One pooled scale over-covers a well-judged target and under-covers a misjudged one; a scale per
    target (Mondrian conformal) covers each; a target with too few voxels keeps the pooled scale."""
    rng = np.random.default_rng(0)
    factors = {"t2": 1.0, "dwi": 4.0, "pd": 2.0}  # how much the raw spread underestimates each target's error
    sizes = {"t2": 40_000, "dwi": 40_000, "pd": 500}
    spreads = {m: rng.uniform(0.5, 2.0, n) for m, n in sizes.items()}
    errors = {m: rng.normal(0, factors[m] * spreads[m]) for m in sizes}
    pooled, own = fit_interval_scales(errors, spreads, 0.9, min_voxels=10_000)
    assert set(own) == {"t2", "dwi"}
    for m in ("t2", "dwi"):
        assert own[m] == pytest.approx(factors[m] * 1.645, rel=0.05)
        fresh_spread = rng.uniform(0.5, 2.0, 20000)
        fresh = rng.normal(0, factors[m] * fresh_spread)
        assert np.mean(np.abs(fresh) <= own[m] * fresh_spread) == pytest.approx(0.9, abs=0.01)
        pooled_coverage = np.mean(np.abs(fresh) <= pooled * fresh_spread)
        assert (pooled_coverage > 0.95) if m == "t2" else (pooled_coverage < 0.85)


def test_finer_groups_cover_a_site_and_a_condition_the_target_scale_misjudges():
    """The calibration groups run from the most specific (target on a dataset from one source) to the
    target; a group whose error the spread misjudges more gets its own scale that covers it, where
    the target's scale under-covers it; a group with too few voxels gets none (it falls back)."""
    from mmdiff.pipelines.ldm import fit_group_scales, interval_groups

    assert interval_groups("t2", "brats", 1) == ["t2 on brats from 1 source", "t2 on brats", "t2 from 1 source", "t2"]
    assert interval_groups("t2", "wml", 3) == ["t2 on wml from 2+ sources", "t2 on wml", "t2 from 2+ sources", "t2"]
    assert interval_groups("t2") == ["t2"] and interval_groups("t2", None, 2) == ["t2 from 2+ sources", "t2"]
    rng = np.random.default_rng(0)
    units = [("brats", 1, 3.0), ("brats", 3, 1.0), ("wml", 3, 1.0), ("wml", 1, 1.0), ("ms", 1, 1.0)]
    sizes = [60_000, 60_000, 60_000, 60_000, 1_000]  # ms: too few voxels for groups of its own
    groups = [interval_groups("t2", d, n) for d, n, _ in units]
    members = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    spreads = rng.uniform(0.5, 2.0, members.size)
    factors = np.array([f for _, _, f in units])[members]
    errors = rng.normal(0, factors * spreads)
    _, own = fit_interval_scales({"t2": errors}, {"t2": spreads}, 0.9)
    scales = fit_group_scales(errors, spreads, groups, members, 0.9, min_voxels=50_000)
    assert set(scales) == {"t2 on brats from 1 source", "t2 on brats from 2+ sources", "t2 on wml from 1 source",
                           "t2 on wml from 2+ sources", "t2 on brats", "t2 on wml", "t2 from 1 source",
                           "t2 from 2+ sources"}
    assert scales["t2 on brats from 1 source"] == pytest.approx(3.0 * 1.645, rel=0.05)
    assert scales["t2 on wml from 2+ sources"] == pytest.approx(1.0 * 1.645, rel=0.05)
    fresh_spread = rng.uniform(0.5, 2.0, 20_000)
    fresh = rng.normal(0, 3.0 * fresh_spread)  # a new slice of the misjudged group
    assert np.mean(np.abs(fresh) <= own["t2"] * fresh_spread) < 0.75
    assert np.mean(np.abs(fresh) <= scales["t2 on brats from 1 source"] * fresh_spread) == pytest.approx(0.9, abs=0.015)


def test_pipeline_scales_each_target_by_its_own_calibration(tmp_path):
    pipe = tiny_ldm()
    volume = square_volume(2)
    kwargs = dict(dataset="brats", num_inference_steps=2, num_samples=2, targets=["t1c", "t2"])
    pipe.register_to_config(interval_scale=2.0)
    pooled = pipe(inputs(volume), generator=torch.Generator().manual_seed(0), **kwargs)
    pipe.register_to_config(interval_scales={"t1c": 4.0})
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = MMDiffPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.interval_scale_for("t1c") == 4.0 and loaded.interval_scale_for("t2") == 2.0
    own = loaded(inputs(volume), generator=torch.Generator().manual_seed(0), **kwargs)
    assert own.uncertainty["t1c"].max() > 0
    np.testing.assert_allclose(own.uncertainty["t1c"], 2 * pooled.uncertainty["t1c"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(own.uncertainty["t2"], pooled.uncertainty["t2"], rtol=1e-5, atol=1e-7)
    # a finer group wins where the call belongs to it: the dataset (in the model's spelling) and the
    # number of sources of this call (T1 + FLAIR: two)
    assert len(inputs(volume)) == 2
    loaded.register_to_config(interval_scales={"t1c": 4.0, "t2 on brats from 2+ sources": 6.0, "t2 on immune": 8.0,
                                               "t1c from 1 source": 10.0})
    assert loaded.interval_scale_for("t2", "brats", 1) == 2.0 and loaded.interval_scale_for("t2", "immune", 3) == 8.0
    grouped = loaded(inputs(volume), generator=torch.Generator().manual_seed(0), **(kwargs | {"dataset": "BraTS"}))
    np.testing.assert_allclose(grouped.uncertainty["t2"], 3 * pooled.uncertainty["t2"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grouped.uncertainty["t1c"], own.uncertainty["t1c"], rtol=1e-5, atol=1e-7)


def test_residual_weight_is_the_least_squares_weight_for_k_runs():
    """Runs estimate the residual with independent noise: the mean of K runs deserves weight
    signal / (signal + noise / K), fitted from runs of another K; noise alone gets weight 0."""
    rng = np.random.default_rng(0)
    signal = rng.normal(0, 1, 200_000)  # E[residual | sources] at each voxel
    errors = signal + rng.normal(0, 1, signal.size)  # y - mu: the residual plus what no model can know
    runs = signal + rng.normal(0, 1, (4, signal.size))  # each run: the signal plus unit noise
    fit = ResidualFit.fit(errors, runs)
    for k in (1, 2, 4, 8):
        assert fit.weight(k) == pytest.approx(1 / (1 + 1 / k), abs=0.02), k
        measured = errors - fit.weight(k) * runs[:k].mean(0) if k <= 4 else None
        if measured is not None:  # the fitted weight is (close to) the best one for the mean of k runs
            best = min(np.square(errors - w * runs[:k].mean(0)).mean() for w in np.linspace(0, 1, 41))
            assert np.square(measured).mean() == pytest.approx(best, rel=2e-3)
    assert ResidualFit.fit(errors, rng.normal(0, 1, (4, signal.size))).weight(8) < 0.02  # unrelated: shrunk away
    assert ResidualFit.fit(errors, -runs).weight(1) == 0.0  # harmful: never subtracted back
    assert ResidualFit.fit(errors, np.zeros((2, signal.size))).weight(1) == 1.0  # an untrained UNet: nothing to weigh


def test_point_estimate_applies_the_fitted_weight_for_its_k(tmp_path):
    """A residual weighted 0 leaves the predictor's image exactly; the weight is stored in the pipeline
    config and depends on K; pipelines saved before it keep weight 1."""
    pipe, gan = tiny_ldm(), tiny_gan()
    volume = square_volume(2)
    kwargs = dict(dataset="brats", num_inference_steps=3)
    plain = pipe(inputs(volume), num_samples=1, generator=torch.Generator().manual_seed(0), **kwargs)
    assert pipe.residual_weight(1) == 1.0
    pipe.register_to_config(residual_fit={"cross": 0.2, "signal": 0.4, "noise": 0.4})  # w(1) = 0.2 / 0.8, w(4) = 0.2 / 0.5
    pipe.save_pretrained(tmp_path)
    loaded = MMDiffPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.residual_weight(1) == pytest.approx(0.25) and loaded.residual_weight(4) == pytest.approx(0.4)
    weighted = loaded(inputs(volume), num_samples=1, generator=torch.Generator().manual_seed(0), **kwargs)
    reference = gan(inputs(volume), dataset="brats").images
    for name, image in weighted.images.items():
        inside = (plain.images[name] > 0) & (plain.images[name] < 1) & (reference[name] > 0) & (reference[name] < 1)
        np.testing.assert_allclose(image[inside], (reference[name] + 0.25 * (plain.images[name] - reference[name]))[inside],
                                   atol=1e-5)
    loaded.register_to_config(residual_fit={"cross": 0.0, "signal": 1.0, "noise": 0.0})
    silenced = loaded(inputs(volume), num_samples=2, generator=torch.Generator().manual_seed(0), **kwargs)
    for name, image in silenced.images.items():
        np.testing.assert_array_equal(image, reference[name])
        assert silenced.uncertainty[name][silenced.mask].mean() > 0  # the samples still spread


def test_pipeline_uncertainty_uses_the_calibrated_scale(tmp_path):
    pipe = tiny_ldm()
    volume = square_volume(2)
    kwargs = dict(dataset="brats", num_inference_steps=3, num_samples=3)
    raw = pipe(inputs(volume), generator=torch.Generator().manual_seed(0), **kwargs)
    pipe.register_to_config(interval_scale=2.5)
    pipe.save_pretrained(tmp_path)
    loaded = MMDiffPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.interval_scale == 2.5 and loaded.config.coverage == 0.9
    calibrated = loaded(inputs(volume), generator=torch.Generator().manual_seed(0), **kwargs)
    for name in raw.images:
        np.testing.assert_array_equal(calibrated.images[name], raw.images[name])
        np.testing.assert_allclose(calibrated.uncertainty[name], 2.5 * raw.uncertainty[name], rtol=1e-6, atol=1e-7)
        assert raw.uncertainty[name][raw.mask].mean() > 0


def test_default_sample_count_is_the_calibrated_one(tmp_path):
    """A call that does not say K gets the K the uncertainty was calibrated at (the stated interval holds
    for it), saved and loaded with the pipeline; an uncalibrated pipeline gets DEFAULT_NUM_SAMPLES."""
    from mmdiff.pipelines.common import diffusion_settings
    from mmdiff.pipelines.ldm import DEFAULT_NUM_SAMPLES

    pipe = tiny_ldm()
    assert pipe.default_num_samples == DEFAULT_NUM_SAMPLES == 2
    pipe.register_to_config(calibration_samples=3, interval_scale=1.5)
    pipe.save_pretrained(tmp_path)
    loaded = MMDiffPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.default_num_samples == 3 and diffusion_settings(loaded)[1] == 3
    assert diffusion_settings(loaded, samples=5)[1] == 5
    volume = square_volume(2)
    kwargs = dict(dataset="brats", num_inference_steps=2, return_samples=True)
    out = loaded(inputs(volume), generator=torch.Generator().manual_seed(0), **kwargs)
    assert all(len(draws) == 3 for draws in out.samples.values())
    three = loaded(inputs(volume), generator=torch.Generator().manual_seed(0), num_samples=3, **kwargs)
    for name in out.images:
        np.testing.assert_array_equal(out.images[name], three.images[name])
        np.testing.assert_array_equal(out.uncertainty[name], three.uncertainty[name])
    loaded.register_to_config(calibration_samples=1)  # K = 1: the one-UNet-pass path, no spread without an error model
    one = loaded(inputs(volume), dataset="brats", num_inference_steps=2)
    assert loaded.default_num_samples == 1 and one.uncertainty is None


def test_sample_spread_pools_the_variance_over_a_window():
    """The uncertainty is the samples' std; with a window its variance is averaged over the window
    (the image is untouched), so a voxel's spread no longer rests on K - 1 degrees of freedom alone."""
    residuals = torch.zeros(2, 1, 1, 7, 7)
    residuals[0, 0, 0, 3, 3], residuals[1, 0, 0, 3, 3] = 1.0, -1.0  # variance 2 at one voxel, 0 elsewhere
    torch.testing.assert_close(sample_spread(residuals, 1), residuals.std(0))
    pooled = sample_spread(residuals, 3)[0, 0]
    torch.testing.assert_close(pooled[2:5, 2:5], torch.full((3, 3), (2 / 9) ** 0.5))  # the voxel's 3 x 3 block
    assert pooled.sum() > 0 and (pooled[:2] == 0).all() and (pooled[:, 5:] == 0).all()
    torch.testing.assert_close(sample_spread(torch.randn(3, 2, 4, 8, 8), 5).shape, torch.Size([2, 4, 8, 8]))
    assert sample_spread(residuals[:1], 5) is None  # one sample: no spread

    pipe = tiny_ldm()
    volume = square_volume(2)
    kwargs = dict(dataset="brats", num_inference_steps=3, num_samples=2)
    raw = pipe(inputs(volume), generator=torch.Generator().manual_seed(0), **kwargs)
    pipe.register_to_config(uncertainty_window=5)
    pooled = pipe(inputs(volume), generator=torch.Generator().manual_seed(0), **kwargs)
    for name in raw.images:
        np.testing.assert_array_equal(pooled.images[name], raw.images[name])
        inside = raw.mask
        assert not np.allclose(pooled.uncertainty[name][inside], raw.uncertainty[name][inside])
        # pooling averages the variance: the mean variance over the slice's interior is about unchanged
        assert pooled.uncertainty[name][inside].std() < raw.uncertainty[name][inside].std()


def test_individual_samples_on_request():
    pipe = tiny_ldm()
    volume = square_volume(2)
    images, uncertainty, mask, samples = pipe(inputs(volume), dataset="brats", num_inference_steps=3, num_samples=3,
                                              generator=torch.Generator().manual_seed(0), return_dict=False,
                                              return_samples=True, point_estimate="sample_mean")
    assert list(samples) == list(images) and all(len(v) == 3 for v in samples.values())
    for name, draws in samples.items():
        stack = np.stack(draws)
        assert stack.shape == (3,) + volume.shape and not np.array_equal(stack[0], stack[1])
        inside = (stack > 0).all(0) & (stack < 1).all(0)  # away from the [0, 1] clamp the mean is the point
        np.testing.assert_allclose(stack.mean(0)[inside], images[name][inside], atol=1e-5)


def test_smooth_slice_noise_is_standard_normal_and_correlated_over_a_slice_or_two():
    """The rule of :class:`SmoothSliceNoise`: each slice's noise is standard normal, slices ``d`` apart
    are correlated ``exp(-d^2 / (4 sigma^2))``, and a slice's noise does not depend on the slices it
    is asked for with (batching, ``slices=``), in any order."""
    noise = SmoothSliceNoise(seed=7, num_samples=2, sigma=1.0)
    volume = noise(list(range(12)), (4, 32, 32))
    assert volume.shape == (2, 12, 4, 32, 32)
    assert abs(float(volume.std()) - 1) < 0.02 and abs(float(volume.mean())) < 0.02
    flat = volume.transpose(0, 1).flatten(1).double()  # [slice, values]
    for lag in (1, 2, 4):
        corr = np.mean([np.corrcoef(flat[z], flat[z + lag])[0, 1] for z in range(12 - lag)])
        assert abs(corr - np.exp(-lag ** 2 / 4)) < 0.03, (lag, corr)
    assert not torch.allclose(volume[0], volume[1])  # the K samples have their own noise
    fresh = SmoothSliceNoise(seed=7, num_samples=2, sigma=1.0)
    torch.testing.assert_close(fresh([5, 6], (4, 32, 32))[:, 1], volume[:, 6])
    torch.testing.assert_close(fresh([2], (4, 32, 32))[:, 0], volume[:, 2])  # an earlier slice after the cache moved on
    assert not torch.allclose(SmoothSliceNoise(seed=8, num_samples=2)([0], (4, 32, 32)), volume[:, :1])
    with pytest.raises(ValueError, match="sigma"):
        SmoothSliceNoise(seed=0, num_samples=1, sigma=0)


def test_slice_noise_modes_from_one_generator():
    """With one generator: ``"smooth"`` (the default) gives neighbouring slices related, not identical,
    samples, whatever the batching; ``"shared"`` gives identical slices identical samples (one texture
    through the volume); ``"independent"`` gives each slice its own, further apart than smooth ones."""
    pipe = tiny_ldm()
    volume = np.repeat(square_volume(1), 8, axis=-1)  # eight identical slices
    kwargs = dict(dataset="brats", num_inference_steps=3, num_samples=2, return_samples=True)

    def run(**more):
        return pipe(inputs(volume), generator=torch.Generator().manual_seed(0), **kwargs, **more).samples

    def neighbour_step(samples):
        return np.mean([np.abs(np.diff(d[0], axis=-1)).mean() for d in samples.values()])

    smooth = run(batch_size=3)
    for name, draws in run(batch_size=1).items():  # the batching does not change a slice's noise
        np.testing.assert_allclose(draws[1], smooth[name][1], atol=1e-5)
    for name, draws in run(slices=[4, 5]).items():  # nor does running a few slices
        np.testing.assert_allclose(draws[0][..., 4:6], smooth[name][0][..., 4:6], atol=1e-5)
    assert all(not np.allclose(d[0][..., 1], d[0][..., 0], atol=1e-4) for d in smooth.values())
    shared = run(slice_noise="shared", batch_size=3)
    for draws in shared.values():
        for k in range(1, 8):
            np.testing.assert_allclose(draws[0][..., k], draws[0][..., 0], atol=1e-5)
    independent = run(slice_noise="independent")
    assert 0 < neighbour_step(smooth) < 0.8 * neighbour_step(independent)
    with pytest.raises(ValueError, match="slice_noise"):
        pipe(inputs(volume), slice_noise="fresh", **kwargs)


def test_validation_conditions_each_row_on_its_own_sources(tmp_path):
    """A validation batch whose rows have different sources gives each row what it gives alone
    (the old stage encoded every row with the first row's sources)."""
    tiny_gan().generator.save_pretrained(tmp_path / "generator")
    config = load_config("ldm-tiny", ["model.validation_samples=2"])
    modalities = ["t1", "t2", "t1c", "flair", "dwi", "adc"]
    stage = LDMStage(config, DATASETS, modalities, "cpu", predictor_path=tmp_path / "generator")
    stage.models["unet"] = tiny_ldm().unet  # non-zero residuals
    images = torch.rand(2, 6, 32, 28, generator=torch.Generator().manual_seed(0))
    sources = torch.tensor([[True, False, False, True, False, False], [False, True, True, False, False, False]])
    targets = torch.tensor([[False, True, False, False, False, False], [True, False, False, False, False, False]])
    dataset_id = torch.tensor([0, 1])
    seeds = lambda rows: [torch.Generator().manual_seed(10 + r) for r in rows]  # noqa: E731
    batched = stage.predict(images, sources, targets, dataset_id, generator=seeds([0, 1]))
    for row in range(2):
        alone = stage.predict(images[row:row + 1], sources[row:row + 1], targets[row:row + 1], dataset_id[row:row + 1],
                              generator=seeds([row]))
        torch.testing.assert_close(batched[row], alone[0], rtol=0, atol=1e-5)
    swapped = stage.predict(images, sources[[0, 0]], targets, dataset_id, generator=seeds([0, 1]))
    assert (swapped[1] - batched[1]).abs().max() > 1e-3  # the sources really change row 1


def test_callback_on_step_end_and_interrupt():
    pipe = tiny_ldm()
    volume = square_volume(3)
    seen = []

    def stop_after_two(pipeline, step, timestep, kwargs):
        seen.append((step, int(timestep), tuple(kwargs["latents"].shape)))
        if len(seen) == 2:
            pipeline._interrupt = True
        return {"latents": kwargs["latents"]}

    out = pipe(inputs(volume), num_inference_steps=5, num_samples=2, batch_size=1,
               generator=torch.Generator().manual_seed(0), callback_on_step_end=stop_after_two)
    assert [s[0] for s in seen] == [0, 1]  # stopped mid-way through the first slice's sampling
    assert seen[0][2][:3] == (1, 6, 4)  # the scaled residual latents of one slice (its brain window)
    assert all(np.all(image[..., 1:] == 0) for image in out.images.values())  # later slices not run
    assert pipe.interrupt  # left set for the caller to see that the call was interrupted
    full = pipe(inputs(volume), num_inference_steps=5, num_samples=2, generator=torch.Generator().manual_seed(0))
    assert not pipe.interrupt and all(image[..., 1:].any() for image in full.images.values())  # reset per call
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(inputs(volume), callback_on_step_end=stop_after_two, callback_on_step_end_tensor_inputs=["noise"])


def test_scheduler_given_to_from_pretrained_is_kept(tmp_path):
    tiny_ldm().save_pretrained(tmp_path)
    ddim = DDIMScheduler.from_config(TRAINING_SCHEDULER)
    pipe = MMDiffPipeline.from_pretrained(tmp_path, scheduler=ddim)
    assert pipe.scheduler is ddim
    assert type(MMDiffPipeline.from_pretrained(tmp_path).scheduler) is DPMSolverMultistepScheduler


def test_single_posterior_mean_runs_one_unet_step():
    """K = 1 with the posterior-mean point estimate needs only the first denoising step: the same image
    as a full run, at one UNet pass per batch instead of one per step."""
    pipe = tiny_ldm()
    calls = []
    pipe.unet.register_forward_hook(lambda module, args, output: calls.append(1))
    volume = square_volume(2)
    kwargs = dict(dataset="brats", num_inference_steps=5, num_samples=1, generator=torch.Generator().manual_seed(0))
    fast = pipe(inputs(volume), **kwargs)
    assert len(calls) == 1 and fast.uncertainty is None
    steps = []
    pipe(inputs(volume), callback_on_step_end=lambda p, i, t, kw: steps.append(i) or {}, **{
        **kwargs, "generator": torch.Generator().manual_seed(0)})
    assert steps == [0] and len(calls) == 2  # the callback sees the one step of this path
    kwargs["generator"] = torch.Generator().manual_seed(0)
    full = pipe(inputs(volume), return_samples=True, **kwargs)
    assert len(calls) == 2 + 5
    for name, image in fast.images.items():
        np.testing.assert_array_equal(image, full.images[name])
        assert not np.array_equal(full.samples[name][0], image)  # the sample itself differs from the mean


def test_a_saved_diffusion_pipeline_passes_the_pre_load_checks(tmp_path):
    """Its model_index holds settings (coverage, interval scale, point estimate) beside components."""
    from mmdiff.validation import check_pipeline_folder

    pipe = tiny_ldm()
    pipe.register_to_config(interval_scale=2.5, calibration_samples=4)
    pipe.save_pretrained(tmp_path / "ldm")
    index = check_pipeline_folder(tmp_path / "ldm")
    assert index["calibration_samples"] == 4 and index["point_estimate"] == "posterior_mean"


def test_a_predictor_trained_inside_the_brain_gives_the_residual_diffusion_its_mean_inside_the_brain():
    """A predictor trained to be right inside the brain only (``config.inside_brain``) draws what it
    likes outside it; the diffusion engine takes its mean as background there, in sampling as in
    training, and will not run it without the brain mask. The pipeline passes each batch's mask: an
    untrained UNet then gives the GAN pipeline's images over the same predictor, bit for bit."""
    pipe, gan = tiny_ldm(trained=False), tiny_gan()
    predictor = pipe.predictor
    images = torch.rand(2, 6, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sources = torch.tensor([True, False, False, True, False, False])
    brain = torch.zeros(2, 16, 16, dtype=torch.bool)
    brain[:, 2:14, 3:12] = True
    args = (predictor, pipe.vae, pipe.unet, pipe.scheduler, images, sources, 0, 1, 3)
    plain, _, _ = sample_residuals(*args, brain=brain)  # a predictor scored on the whole slice: its mean as is
    assert (plain.permute(0, 2, 3, 1)[~brain] != -1).any()
    predictor.register_to_config(inside_brain=True)
    with pytest.raises(ValueError, match="brain mask"):
        sample_residuals(*args)
    mu, _, _ = sample_residuals(*args, brain=brain)
    assert torch.all(mu.permute(0, 2, 3, 1)[~brain] == -1)
    torch.testing.assert_close(mu.permute(0, 2, 3, 1)[brain], plain.permute(0, 2, 3, 1)[brain], rtol=0, atol=0)

    gan.generator.register_to_config(inside_brain=True)
    volume = square_volume()
    out = pipe(inputs(volume), dataset="brats", num_inference_steps=3, num_samples=1)
    reference = gan(inputs(volume), dataset="brats")
    for name, image in reference.images.items():
        np.testing.assert_array_equal(out.images[name], image)
