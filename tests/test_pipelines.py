"""MMDiffPipeline and MMGANPipeline with tiny random components (diffusers-style pipeline tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import blob_volume, centred_affine
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

from mmdiff.io import SYNTHETIC_DESCRIP, load_volume
from mmdiff.models import ErrorScaleNet, HaarWavelet, MultiModalGenerator, ResidualUNet
from mmdiff.cli import PRECISION_NAMES, SCHEDULER_NAMES
from mmdiff.pipelines import PRECISIONS, SCHEDULERS, MMDiffPipeline, MMDiffPipelineOutput, MMGANPipeline, use_scheduler
from mmdiff.pipelines.ldm import TRAINING_SCHEDULER

DATASETS = ["brats", "ixi"]
STEPS = 4


def tiny_unet(trained: bool = True) -> ResidualUNet:
    """A tiny residual UNet for a one-level Haar latent (4 channels); ``trained`` randomises its zero-initialised
    output layer and PFM projections, as training would, so that it predicts non-zero residuals."""
    unet = ResidualUNet(num_datasets=2, dataset_names=DATASETS, latent_channels=4, block_out_channels=(8, 16),
                        embedding_dim=16, norm_num_groups=4)
    if trained:
        for name, parameter in unet.named_parameters():
            if "to_scale_shift" in name or "conv_out" in name:
                torch.nn.init.normal_(parameter, std=0.05)
    return unet


def tiny_ldm(seed: int = 0, trained: bool = True, error_model: bool = False) -> MMDiffPipeline:
    """Haar /2, UNet /2, predictor /2: slices are padded to multiples of 4; DPM-Solver++ sampler; with
    ``error_model``, a tiny :class:`~mmdiff.models.ErrorScaleNet` whose output varies (as a trained one's)."""
    predictor = tiny_gan(seed).generator
    torch.manual_seed(seed)
    errors = None
    if error_model:
        errors = ErrorScaleNet(modalities=predictor.config.modalities, num_datasets=2, dataset_names=DATASETS,
                               channels=8, num_layers=2)
        torch.nn.init.normal_(errors.conv_out.weight, std=0.1)
    pipe = MMDiffPipeline(HaarWavelet(levels=1), tiny_unet(trained),
                          DPMSolverMultistepScheduler.from_config(TRAINING_SCHEDULER), predictor, error_model=errors)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_gan(seed: int = 0, modalities=("t1", "t2", "t1c", "flair", "dwi", "adc")) -> MMGANPipeline:
    """Generator /2; its PFM projections are randomised so the dataset id changes the output."""
    torch.manual_seed(seed)
    network = MultiModalGenerator(modalities=modalities, num_datasets=2, dataset_names=DATASETS,
                                  block_out_channels=(8, 16), embedding_dim=16, norm_num_groups=4)
    for name, parameter in network.named_parameters():
        if "to_scale_shift" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    pipe = MMGANPipeline(network)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def brain_slice(size=(30, 26), shift: float = 0.0) -> np.ndarray:
    """A textured disc on zero background (odd-free sizes exercise the padding)."""
    xx, yy = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")
    disc = ((xx - size[0] / 2) ** 2 + (yy - size[1] / 2) ** 2) < 10**2
    return (disc * (500 + 200 * np.sin(xx / 3.0 + shift) * np.cos(yy / 4.0))).astype(np.float32)


def flat_topped_slice() -> np.ndarray:
    """A brain slice whose brightest 10 % share one value, so the clip percentile is that value whether
    the slice is alone or repeated in a volume."""
    image = brain_slice()
    return np.minimum(image, np.percentile(image[image > 0], 90))


def brain_volume(slices: int = 4) -> np.ndarray:
    """Slices of brain, then one empty slice."""
    return np.stack([brain_slice(shift=k) for k in range(slices)] + [np.zeros((30, 26), np.float32)], axis=-1)


def inputs(volume: np.ndarray) -> dict:
    return {"t1": volume, "FLAIR": np.sqrt(volume) * 20}


def seeded(seed: int = 0, count: int | None = None):
    if count is None:
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + k) for k in range(count)]


def test_ldm_scheduler_kept_as_given_and_determinism():
    pipe = tiny_ldm()
    kept = MMDiffPipeline(pipe.vae, pipe.unet, DDPMScheduler.from_config(TRAINING_SCHEDULER), pipe.predictor)
    assert type(kept.scheduler) is DDPMScheduler  # no silent swap: the sampler is chosen at export or call time
    volume = brain_volume()
    first = pipe(inputs(volume), dataset="brats", num_inference_steps=STEPS, generator=seeded(1), num_samples=1)
    second = pipe(inputs(volume), dataset="brats", num_inference_steps=STEPS, generator=seeded(1), num_samples=1)
    other = pipe(inputs(volume), dataset="brats", num_inference_steps=STEPS, generator=seeded(2), num_samples=1)
    assert isinstance(first, MMDiffPipelineOutput)
    assert list(first.images) == ["t2", "t1c", "dwi", "adc"]  # every modality not given, in model order
    assert first.uncertainty is None
    for name, image in first.images.items():
        assert image.shape == volume.shape and image.dtype == np.float32
        assert 0 <= image.min() and image.max() <= 1
        np.testing.assert_array_equal(image, second.images[name])
        assert not np.array_equal(image, other.images[name])
        assert np.all(image[~first.mask] == 0)
        assert np.all(image[..., -1] == 0)  # the slice without brain
    assert first.mask[..., :-1].any(axis=(0, 1)).all()


@pytest.mark.parametrize("kind", ["ldm", "gan"])
def test_save_load_roundtrip(tmp_path, kind):
    pipe = tiny_ldm() if kind == "ldm" else tiny_gan()
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    loaded = type(pipe).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    if kind == "ldm":
        assert index["unet"] == ["mmdiff.models.unet", "ResidualUNet"]
        assert index["vae"] == ["mmdiff.models.wavelet", "HaarWavelet"]
        assert index["predictor"] == ["mmdiff.models.gan", "MultiModalGenerator"]
        assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]
        public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
        assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    else:
        assert index["generator"] == ["mmdiff.models.gan", "MultiModalGenerator"]
    kwargs = dict(dataset="ixi", num_inference_steps=STEPS) if kind == "ldm" else dict(dataset="ixi")
    before = pipe(inputs(brain_volume()), generator=seeded(3), **kwargs)
    after = loaded(inputs(brain_volume()), generator=seeded(3), **kwargs)
    for name in before.images:
        if kind == "ldm":
            np.testing.assert_array_equal(before.images[name], after.images[name])
        else:  # weights loaded from safetensors are not 64-byte aligned, and oneDNN then sums some
            # convolutions (the GAN's smaller per-slice windows) in another order: ~1e-7 apart
            np.testing.assert_allclose(before.images[name], after.images[name], rtol=0, atol=1e-6)


def test_generic_from_pretrained_in_fresh_process(tmp_path):
    """``DiffusionPipeline.from_pretrained`` with remote code off: fails before ``import mmdiff``, returns
    the mmdiff pipeline after it (diffusers imported first), with identical outputs."""
    volume = brain_volume(2)
    np.save(tmp_path / "volume.npy", volume)
    ldm, gan = tiny_ldm(), tiny_gan()
    ldm.save_pretrained(tmp_path / "ldm")
    gan.save_pretrained(tmp_path / "gan")
    np.save(tmp_path / "ldm.npy", ldm({"t1": volume}, num_inference_steps=STEPS, generator=seeded(5)).images["t2"])
    np.save(tmp_path / "gan.npy", gan({"t1": volume}).images["t2"])
    script = textwrap.dedent(f"""
        import sys
        import numpy as np, torch
        from diffusers import DiffusionPipeline
        root = {str(tmp_path)!r}
        try:
            DiffusionPipeline.from_pretrained(root + "/ldm")
            raise SystemExit("loaded without importing mmdiff: update the docs")
        except AttributeError as exc:
            assert "MMDiffPipeline" in str(exc), exc
        import mmdiff  # enough: the pipelines are imported on first use
        assert "mmdiff.pipelines" not in sys.modules
        volume = np.load(root + "/volume.npy")
        ldm = DiffusionPipeline.from_pretrained(root + "/ldm")
        gan = DiffusionPipeline.from_pretrained(root + "/gan")
        import mmdiff.pipelines
        assert type(ldm) is mmdiff.pipelines.MMDiffPipeline and type(gan) is mmdiff.pipelines.MMGANPipeline
        out = ldm({{"t1": volume}}, num_inference_steps={STEPS}, generator=torch.Generator().manual_seed(5))
        np.testing.assert_array_equal(out.images["t2"], np.load(root + "/ldm.npy"))
        # (unaligned weights from safetensors: oneDNN's summation order may differ, ~1e-7)
        np.testing.assert_allclose(gan({{"t1": volume}}).images["t2"], np.load(root + "/gan.npy"), rtol=0, atol=1e-6)
        print("ok")
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_schedulers_by_name():
    assert SCHEDULER_NAMES == tuple(SCHEDULERS)  # the CLI's choices, kept without importing diffusers
    assert PRECISION_NAMES == PRECISIONS
    pipe = tiny_ldm()
    trained = dict(pipe.scheduler.config)  # the noise schedule the model was trained with
    use_scheduler(pipe, "ddim")
    assert type(pipe.scheduler) is DDIMScheduler
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        assert pipe.scheduler.config[key] == trained[key], key
    assert (pipe.scheduler.config.beta_schedule, pipe.scheduler.config.beta_end) == ("scaled_linear", 0.012)
    use_scheduler(pipe, "dpm++")
    assert type(pipe.scheduler) is DPMSolverMultistepScheduler
    with pytest.raises(ValueError, match="unknown scheduler 'plms'"):
        use_scheduler(pipe, "plms")


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, UniPCMultistepScheduler, EulerDiscreteScheduler])
def test_scheduler_swap(scheduler_class):
    pipe = tiny_ldm()
    vae, unet, index = pipe.vae, pipe.unet, dict(pipe.config)
    volume = brain_volume(2)
    sampled = dict(num_inference_steps=STEPS, num_samples=2, point_estimate="sample_mean")  # every step runs
    reference = pipe({"t1": volume}, generator=seeded(0), **sampled)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    swapped = pipe({"t1": volume}, generator=seeded(0), **sampled)
    assert type(pipe.scheduler) is scheduler_class
    assert pipe.vae is vae and pipe.unet is unet
    assert {k: v for k, v in pipe.config.items() if k != "scheduler"} == {k: v for k, v in index.items()
                                                                          if k != "scheduler"}
    assert pipe.config["scheduler"] == ("diffusers", scheduler_class.__name__)
    np.testing.assert_array_equal(swapped.mask, reference.mask)
    # the swapped scheduler is the one that samples: the same as a pipeline built with it, not the old one
    built = MMDiffPipeline(vae, unet, scheduler_class.from_config(pipe.scheduler.config), pipe.predictor)
    built.set_progress_bar_config(disable=True)
    expected = built({"t1": volume}, generator=seeded(0), **sampled)
    for name, image in swapped.images.items():
        assert image.shape == volume.shape and np.isfinite(image).all() and 0 <= image.min() <= image.max() <= 1
        np.testing.assert_array_equal(image, expected.images[name])
        assert np.abs(image - reference.images[name]).max() > 1e-3


def test_scheduler_set_later_is_kept():
    pipe = tiny_ldm()
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pipe({"t1": brain_slice()}, num_inference_steps=STEPS, generator=seeded(0))
    assert type(pipe.scheduler) is DDPMScheduler


def test_gan_batches_match_single_slices():
    """Equal up to float32 rounding: the batch size changes the conv kernels' summation order (~1e-6)."""
    pipe = tiny_gan()
    volume = brain_volume()
    batched = pipe(inputs(volume), dataset="brats", batch_size=4)
    one_by_one = pipe(inputs(volume), dataset="brats", batch_size=1)
    for name in batched.images:
        torch.testing.assert_close(batched.images[name], one_by_one.images[name], rtol=0, atol=1e-5)
    # a volume of one repeated slice, with its mask given, gives that slice's 2D result on every slice
    image = flat_topped_slice()
    mask = image > 0
    repeated = pipe(inputs(np.repeat(image[..., None], 3, -1)), brain_mask=np.repeat(mask[..., None], 3, -1))
    single = pipe(inputs(image), brain_mask=mask)
    for name, out in single.images.items():
        assert out.shape == image.shape
        for k in range(3):
            torch.testing.assert_close(repeated.images[name][..., k], out, rtol=0, atol=1e-5)


def test_ldm_per_slice_generators_match_single_slices():
    pipe = tiny_ldm()
    image = flat_topped_slice()
    mask = image > 0
    volume, volume_mask = np.repeat(image[..., None], 3, -1), np.repeat(mask[..., None], 3, -1)
    kwargs = dict(dataset="brats", num_inference_steps=STEPS, num_samples=2)
    batched = pipe(inputs(volume), brain_mask=volume_mask, generator=seeded(10, 3), batch_size=3, **kwargs)
    for k in range(3):
        single = pipe(inputs(image), brain_mask=mask, generator=seeded(10 + k), **kwargs)
        for name, out in single.images.items():
            torch.testing.assert_close(batched.images[name][..., k], out, rtol=0, atol=1e-5)
            torch.testing.assert_close(batched.uncertainty[name][..., k], single.uncertainty[name], rtol=0, atol=1e-5)


def test_only_the_slices_asked_for_are_run_with_their_whole_volume_result():
    """``slices=``: a 2.5D GAN still reads the neighbours of the slices it runs, and the diffusion
    engine with per-slice generators gives those slices exactly what the whole run gives them."""
    torch.manual_seed(0)
    network = MultiModalGenerator(modalities=("t1", "t2", "t1c", "flair", "dwi", "adc"), num_datasets=2,
                                  dataset_names=DATASETS, block_out_channels=(8, 16), embedding_dim=16,
                                  norm_num_groups=4, modality_streams=False, shared_decoder=True,
                                  context_slices=1, patch_size=2)
    gan = MMGANPipeline(network)
    gan.set_progress_bar_config(disable=True)
    volume = brain_volume()
    chosen = [1, 3]
    for pipe, kwargs in ((gan, {}), (tiny_ldm(), dict(num_inference_steps=STEPS, num_samples=2))):
        if pipe.engine == "ldm":
            kwargs["generator"] = seeded(0, volume.shape[2])
        whole = pipe(inputs(volume), dataset="brats", **kwargs)
        if pipe.engine == "ldm":
            kwargs["generator"] = seeded(0, volume.shape[2])
        part = pipe(inputs(volume), dataset="brats", slices=chosen, **kwargs)
        others = [k for k in range(volume.shape[2]) if k not in chosen]
        for name, image in part.images.items():
            torch.testing.assert_close(image[..., chosen], whole.images[name][..., chosen], rtol=0, atol=1e-5)
            assert not image[..., others].any() and whole.images[name][..., others].any()
        with pytest.raises(ValueError, match="outside the volume"):
            pipe(inputs(volume), dataset="brats", slices=[volume.shape[2]], **kwargs)


def test_2d_tensor_input_and_pt_output():
    pipe = tiny_gan()
    image = torch.from_numpy(brain_slice())
    out = pipe({"t1n": image, "t2w": image.sqrt()}, targets="t1ce", output_type="pt")
    assert list(out.images) == ["t1c"]
    assert isinstance(out.images["t1c"], torch.Tensor) and out.images["t1c"].shape == image.shape
    assert isinstance(out.mask, torch.Tensor) and out.mask.dtype == torch.bool
    images, uncertainty, mask = pipe({"t1": image}, targets=["flair"], return_dict=False)
    assert images["flair"].shape == image.shape and uncertainty is None and mask.shape == image.shape


def test_nifti_input_and_output_on_own_grid(tmp_path):
    shape = (35, 39, 6)  # odd in-plane sides: padded for the network, cropped back
    lps = centred_affine(shape, flip=(-1, -1, 1))
    t1, brain, _ = blob_volume(shape, seed=1, affine=lps)
    flair, _, _ = blob_volume(shape, seed=2, affine=lps)
    nib.save(t1, tmp_path / "t1.nii.gz")
    nib.save(flair, tmp_path / "flair.nii.gz")
    pipe = tiny_gan()
    paths = {"t1": tmp_path / "t1.nii.gz", "flair": str(tmp_path / "flair.nii.gz")}
    out = pipe(paths, dataset="brats", output_type="nifti")
    as_arrays = pipe(paths, dataset="brats")
    canonical = pipe({m: load_volume(p).data for m, p in paths.items()}, dataset="brats")
    for name, image in out.images.items():
        assert isinstance(image, nib.Nifti1Image) and image.shape == shape
        np.testing.assert_allclose(image.affine, lps)
        assert image.header["descrip"].item().decode() == SYNTHETIC_DESCRIP
        np.testing.assert_array_equal(image.get_fdata(dtype=np.float32), as_arrays.images[name])
        np.testing.assert_array_equal(np.asarray(nib.as_closest_canonical(image).dataobj), canonical.images[name])
    assert isinstance(out.mask, nib.Nifti1Image) and out.mask.shape == shape
    assert (np.asarray(out.mask.dataobj) > 0).sum() == pytest.approx(brain.sum(), rel=0.2)


def test_arrays_with_affine_give_nifti():
    affine = centred_affine((30, 26, 5), spacing=(1.0, 1.0, 2.0))
    out = tiny_gan()(inputs(brain_volume()), output_type="nifti", affine=affine)
    for image in out.images.values():
        assert image.shape == (30, 26, 5) and np.allclose(image.affine, affine)
        assert image.header["descrip"].item().decode() == SYNTHETIC_DESCRIP


def test_nifti_on_another_overlapping_grid_is_resampled(tmp_path):
    shape = (32, 36, 6)
    t1, _, _ = blob_volume(shape, seed=1, affine=centred_affine(shape, flip=(-1, -1, 1)))
    flair, _, _ = blob_volume((30, 34, 6), seed=2)  # RAS, another grid over the same anatomy
    nib.save(t1, tmp_path / "t1.nii.gz")
    nib.save(flair, tmp_path / "flair.nii.gz")
    with pytest.warns(UserWarning, match="resampled"):
        out = tiny_gan()({"t1": tmp_path / "t1.nii.gz", "flair": tmp_path / "flair.nii.gz"}, output_type="nifti")
    assert all(image.shape == shape for image in out.images.values())


def test_uncertainty_from_several_samples():
    pipe = tiny_ldm()
    volume = brain_volume(2)
    out = pipe(inputs(volume), num_inference_steps=STEPS, generator=seeded(0), num_samples=2)
    for name, std in out.uncertainty.items():
        assert std.shape == volume.shape
        assert (std[out.mask] > 0).mean() > 0.9 and np.all(std[~out.mask] == 0)
    with pytest.raises(ValueError, match="deterministic"):
        tiny_gan()(inputs(volume), num_samples=2)


def test_unknown_dataset_warns_and_uses_null():
    pipe = tiny_gan()
    image = brain_slice()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        null = pipe({"t1": image}, dataset=None).images["t2"]
        known = pipe({"t1": image}, dataset="BraTS").images["t2"]
    with pytest.warns(UserWarning, match="'oasis' is not one the model was trained on.*null dataset"):
        unknown = pipe({"t1": image}, dataset="oasis").images["t2"]
    np.testing.assert_array_equal(unknown, null)
    assert not np.array_equal(known, null)


def _far_away_nifti(tmp_path):
    shape = (20, 20, 4)
    near, _, _ = blob_volume(shape)
    far_affine = centred_affine(shape)
    far_affine[:3, 3] += 500.0
    nib.save(near, tmp_path / "near.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(near.dataobj), far_affine), tmp_path / "far.nii.gz")
    return {"t1": tmp_path / "near.nii.gz", "t2": tmp_path / "far.nii.gz"}


BAD_INPUTS = {
    "unknown modality": (lambda p: dict(images={"t1": brain_slice(), "swi": brain_slice()}), "unknown modality 'swi'"),
    "a sequence the model lacks": (lambda p: dict(images={"t1": brain_slice(), "pd": brain_slice()}),
                                   "input 'pd': the model was not trained on pd"),
    "no input": (lambda p: dict(images={}), "no input images"),
    "target given": (lambda p: dict(images={"t1": brain_slice()}, targets=["t1n"]), "target t1 is also an input"),
    "input not trained": (lambda p: dict(images={"dwi": brain_slice()}), "not trained on dwi"),
    "target not trained": (lambda p: dict(images={"t1": brain_slice()}, targets="adc"), "not trained on adc"),
    "nothing to do": (lambda p: dict(images={m: brain_slice() for m in ("t1", "t2", "flair")}), "nothing to synth"),
    "shapes differ": (lambda p: dict(images={"t1": brain_slice(), "t2": brain_slice((30, 30))}), "different shapes"),
    "2D and 3D": (lambda p: dict(images={"t1": brain_slice(), "t2": brain_volume()}), "mix 2D slices and 3D"),
    "empty": (lambda p: dict(images={"t1": np.zeros((0, 26))}), "empty array"),
    "all zero": (lambda p: dict(images={"t1": np.zeros((30, 26))}), "every input image is zero"),
    "4D": (lambda p: dict(images={"t1": np.zeros((4, 4, 4, 4))}), r"expected a 2D slice \[H, W\] or a volume"),
    "grids apart": (lambda p: dict(images=_far_away_nifti(p)), "does not overlap"),
    "paths and arrays": (lambda p: dict(images={**_far_away_nifti(p), "t2": brain_volume()}), "mix NIfTI paths and arrays"),
    "missing file": (lambda p: dict(images={"t1": p / "none.nii.gz"}), "no such file"),
    "empty mask": (lambda p: dict(images={"t1": brain_slice()}, brain_mask=np.zeros((30, 26))), "brain mask is empty"),
    "mask shape": (lambda p: dict(images={"t1": brain_slice()}, brain_mask=np.ones((8, 8))), "brain_mask has shape"),
    "output type": (lambda p: dict(images={"t1": brain_slice()}, output_type="png"), "output_type must be one of"),
    "nifti from arrays": (lambda p: dict(images={"t1": brain_volume()}, output_type="nifti"), "needs NIfTI inputs"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_clear_error(tmp_path, case):
    pipe = tiny_gan(modalities=("t1", "t2", "flair"))
    make_kwargs, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        pipe(**make_kwargs(tmp_path))


def test_bad_generator_list_length():
    with pytest.raises(ValueError, match="one per axial slice"):
        tiny_ldm()({"t1": brain_volume()}, num_inference_steps=STEPS, generator=seeded(0, 2))
