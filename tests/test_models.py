"""The networks: PFM, the latents (Haar wavelet, VAE), the residual diffusion UNet, the GAN generator and discriminators."""

from __future__ import annotations

import json

import pytest
import torch

from mmdiff.losses import selective_l1
from mmdiff.models import (
    NULL_DATASET_ID,
    DatasetEmbedding,
    FeatureModulation,
    ModalityDiscriminators,
    MultiModalGenerator,
    ResidualUNet,
    build_vae,
    decode_modalities,
    downsampling_factor,
    drop_dataset_id,
    encode_modalities,
    measure_scaling_factor,
)
from mmdiff.models import gan, unet, vae, wavelet
from mmdiff.modalities import MODALITIES

M = len(MODALITIES)
T1, T2, T1C, FLAIR, DWI, ADC = range(M)


def tiny_unet(modalities=MODALITIES, **kwargs) -> ResidualUNet:
    config = dict(modalities=list(modalities), num_datasets=3, latent_channels=2, block_out_channels=(16, 32),
                  layers_per_block=1, embedding_dim=16, norm_num_groups=8)
    return ResidualUNet(**{**config, **kwargs})


def tiny_generator(**kwargs) -> MultiModalGenerator:
    config = dict(num_datasets=3, block_out_channels=(8, 16, 16), layers_per_block=1, embedding_dim=16,
                  norm_num_groups=4)
    return MultiModalGenerator(**{**config, **kwargs})


def perturb_modulations(model: torch.nn.Module, seed: int = 0) -> None:
    """FeatureModulation starts as the identity; give it weights, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FeatureModulation):
                for parameter in module.parameters():
                    parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def public_config(model) -> dict:
    """The config as saved to JSON (tuples become lists), without diffusers' private keys."""
    return json.loads(json.dumps({k: v for k, v in model.config.items() if not k.startswith("_")}))


def images(batch=2, size=16, seed=0) -> torch.Tensor:
    return torch.rand(batch, M, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def mask(*present, batch=2) -> torch.Tensor:
    row = torch.zeros(M, dtype=torch.bool)
    row[list(present)] = True
    return row.expand(batch, M).clone()


# --- PFM -------------------------------------------------------------------------------------------


def test_dataset_embedding_null_id_and_range():
    embedding = DatasetEmbedding(num_datasets=3, embedding_dim=8)
    out = embedding(torch.tensor([0, 1, 2, NULL_DATASET_ID]))
    assert out.shape == (4, 8)
    assert all(not torch.allclose(out[i], out[j]) for i in range(4) for j in range(i))
    for bad in (3, -2):
        with pytest.raises(ValueError, match="dataset ids"):
            embedding(torch.tensor([bad]))


def test_feature_modulation_starts_as_identity_then_modulates():
    modulation = FeatureModulation(embedding_dim=8, channels=4)
    features, embedding = torch.randn(2, 4, 5, 5), torch.randn(2, 8)
    assert torch.equal(modulation(features, embedding), features)
    perturb_modulations(modulation)
    gamma, beta = modulation.to_scale_shift(embedding)[:, :, None, None].chunk(2, dim=1)
    torch.testing.assert_close(modulation(features, embedding), features * (1 + gamma) + beta)


def test_drop_dataset_id():
    ids = torch.arange(1000) % 3
    assert torch.equal(drop_dataset_id(ids, 0.0), ids)
    assert (drop_dataset_id(ids, 1.0) == NULL_DATASET_ID).all()
    dropped = drop_dataset_id(ids, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(dropped, drop_dataset_id(ids, 0.3, torch.Generator().manual_seed(0)))
    assert 0.25 < (dropped == NULL_DATASET_ID).float().mean() < 0.35
    kept = dropped != NULL_DATASET_ID
    assert torch.equal(dropped[kept], ids[kept])
    # only some datasets' ids dropped (the null embedding learns what they share): the same draw, others kept
    some = drop_dataset_id(ids, 0.3, torch.Generator().manual_seed(0), only=[0, 2])
    assert (some[ids == 1] == 1).all()
    eligible = ids != 1
    assert torch.equal(some[eligible], dropped[eligible])


# --- VAE -------------------------------------------------------------------------------------------


def test_vae_shapes_and_downsampling_factor_4():
    model = build_vae(block_out_channels=(8, 16, 16), latent_channels=4, mid_block_add_attention=False)
    assert model.config.norm_num_groups == 8 and model.config.in_channels == 1
    assert downsampling_factor(model) == 4
    x = images(batch=2, size=32)
    with torch.no_grad():
        latents = encode_modalities(model, x)
        assert latents.shape == (2, M, 4, 8, 8)
        assert decode_modalities(model, latents).shape == x.shape
        sampled = encode_modalities(model, x, sample=True, generator=torch.Generator().manual_seed(0))
        assert sampled.shape == latents.shape and not torch.equal(sampled, latents)
        # each modality is encoded on its own: the latents of t1 do not depend on the other channels
        other = x.clone()
        other[:, 1:] = 0
        torch.testing.assert_close(encode_modalities(model, other)[:, 0], latents[:, 0])


def test_scaling_factor_gives_unit_latent_std_and_ignores_missing_modalities():
    torch.manual_seed(0)
    model = build_vae(block_out_channels=(8, 16, 16), mid_block_add_attention=False)
    batches = [images(batch=2, size=16, seed=s) for s in range(3)]
    factor = measure_scaling_factor(model, batches)
    model.register_to_config(scaling_factor=factor)
    with torch.no_grad():
        latents = torch.cat([encode_modalities(model, b) for b in batches])
    assert latents.std().item() == pytest.approx(1.0, rel=0.02)

    available = mask(T1, FLAIR)
    polluted = [b.masked_fill(~available[:, :, None, None], 50.0) for b in batches]
    present_only = [b[:, [T1, FLAIR]] for b in batches]
    assert measure_scaling_factor(model, [(b, available) for b in polluted]) == pytest.approx(
        measure_scaling_factor(model, present_only), rel=1e-6
    )


# --- residual diffusion UNet ----------------------------------------------------------------------


@pytest.mark.parametrize("modalities", [MODALITIES, ("t1", "t2", "pd")])
def test_unet_output_shape_and_zero_initial_output(modalities):
    model = tiny_unet(modalities)
    n = len(modalities)
    assert model.conv_in.in_channels == 2 * n * 2 + n and model.conv_out.out_channels == n * 2
    noisy = torch.randn(3, n, 2, 8, 8)
    source_mask = torch.zeros(3, n, dtype=torch.bool)
    source_mask[:, 0] = True
    out = model(noisy, torch.tensor([1, 50, 999]), torch.randn_like(noisy), source_mask, torch.tensor([0, 2, -1]))
    assert out.sample.shape == noisy.shape
    assert torch.all(out.sample == 0)  # zero-initialised output: an untrained UNet predicts no residual
    assert model(noisy, 10, noisy, source_mask, 0, return_dict=False)[0].shape == noisy.shape


def test_unet_conditioning_is_live_and_source_noise_does_not_leak():
    torch.manual_seed(0)
    model = tiny_unet()
    perturb_modulations(model)
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    model.eval()
    noisy, condition = torch.randn(2, M, 2, 8, 8), torch.randn(2, M, 2, 8, 8)
    sources = mask(T1, T2)
    with torch.no_grad():
        base = model(noisy, 100, condition, sources, 0).sample
        assert not torch.allclose(base, model(noisy, 500, condition, sources, 0).sample)  # timestep
        assert not torch.allclose(base, model(noisy, 100, condition, sources, 1).sample)  # dataset (PFM)
        assert not torch.allclose(base, model(noisy, 100, condition, sources, NULL_DATASET_ID).sample)
        assert not torch.allclose(base, model(noisy, 100, condition, mask(T1, T2, FLAIR), 0).sample)  # mask
        assert not torch.allclose(base, model(noisy, 100, condition * 2, sources, 0).sample)  # condition (mu)
        # the noisy residual of a source is zeroed inside the model
        leaked = noisy.clone()
        leaked[:, T1] = 100.0
        torch.testing.assert_close(model(leaked, 100, condition, sources, 0).sample, base)
        # use_pfm=False: every dataset gets the null embedding
        ablated = tiny_unet(use_pfm=False)
        ablated.load_state_dict(model.state_dict())
        ablated.eval()
        torch.testing.assert_close(ablated(noisy, 100, condition, sources, 1).sample,
                                   model(noisy, 100, condition, sources, NULL_DATASET_ID).sample)
    with pytest.raises(ValueError, match="modalities"):
        model(noisy[:, :3], 100, condition[:, :3], sources[:, :3], 0)


def test_unet_overfits_one_batch():
    from diffusers import DDPMScheduler

    from mmdiff.models import diffusion_loss
    from mmdiff.pipelines.ldm import TRAINING_SCHEDULER

    torch.manual_seed(0)
    model = tiny_unet()
    scheduler = DDPMScheduler(**TRAINING_SCHEDULER)
    residual, condition = torch.randn(4, M, 2, 8, 8), torch.randn(4, M, 2, 8, 8)
    sources, weight = mask(T1, T2, batch=4), (~mask(T1, T2, batch=4)).float()
    weight[:, ADC] = 0  # no ground truth: never scored
    ids = torch.tensor([0, 1, 2, -1])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    first = diffusion_loss(model, scheduler, residual, condition, sources, weight, ids, generator).item()
    for _ in range(150):
        loss = diffusion_loss(model, scheduler, residual, condition, sources, weight, ids, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    final = torch.stack([diffusion_loss(model, scheduler, residual, condition, sources, weight, ids, generator)
                         for _ in range(8)]).mean().item()
    assert final < first / 5
    poisoned = residual.clone()
    poisoned[:, ADC] = float("nan")  # a missing sequence's placeholder never enters the loss
    assert torch.isfinite(diffusion_loss(model, scheduler, poisoned, condition, sources, weight, ids))


# --- GAN -------------------------------------------------------------------------------------------


def test_generator_output_range_and_fully_convolutional():
    model = tiny_generator()
    for size in (16, 32):
        out = model(images(size=size), mask(T1, T2), torch.tensor([0, 1]))
        assert out.shape == (2, M, size, size)
        assert out.abs().max() <= 1
    with pytest.raises(ValueError, match="divisible"):
        model(images(size=18), mask(T1), 0)
    with pytest.raises(ValueError, match="at least one source"):
        model(images(), torch.zeros(2, M, dtype=torch.bool), 0)


def test_generator_absent_encoders_get_no_gradient():
    model = tiny_generator()
    model(images(), mask(T1, FLAIR), 0).square().mean().backward()
    for index, encoder in enumerate(model.modality_encoders):
        grads = [p.grad for p in encoder.parameters()]
        if index in (T1, FLAIR):
            assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None for g in grads)


def test_generator_mixed_sources_are_masked_per_sample():
    """Sample 0 has t1 + t2, sample 1 t1 only: t2's encoder runs, but nothing of it reaches sample 1."""
    model = tiny_generator()
    perturb_modulations(model)
    x, sources = images(), mask(T1, T2)
    sources[1, T2] = False
    out = model(x, sources, 0)
    out[1].square().mean().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.modality_encoders[T2].parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.modality_encoders[T1].parameters())
    changed = x.clone()
    changed[1, T2] = -changed[1, T2]
    with torch.no_grad():
        torch.testing.assert_close(model(changed, sources, 0)[1], out[1].detach())


def test_generator_dataset_id_changes_output():
    model = tiny_generator().eval()
    x, sources = images(), mask(T1, T2)
    with torch.no_grad():
        # fresh PFM is the identity: the id has no effect yet
        torch.testing.assert_close(model(x, sources, 0), model(x, sources, 1))
        perturb_modulations(model)
        outputs = [model(x, sources, dataset_id) for dataset_id in (0, 1, NULL_DATASET_ID)]
    assert not torch.allclose(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], outputs[2])


def test_generator_without_pfm_ignores_the_dataset():
    model = tiny_generator(use_pfm=False).eval()
    perturb_modulations(model)
    x, sources = images(), mask(T1, T2)
    with torch.no_grad():
        outputs = [model(x, sources, dataset_id) for dataset_id in (0, 1, NULL_DATASET_ID)]
        with_pfm = MultiModalGenerator.from_config({**model.config, "use_pfm": True})
        with_pfm.load_state_dict(model.state_dict())
        different = with_pfm.eval()(x, sources, 0)
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[0], outputs[2])  # every id gets the null embedding
    assert not torch.allclose(different, outputs[0])


def test_generator_overfits_one_batch_with_l1():
    torch.manual_seed(0)
    model = tiny_generator()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    target = torch.stack([torch.sin(3 * (k + 1) * xx + k * yy) * 0.8 for k in range(M)])[None].repeat(2, 1, 1, 1)
    target[1] = target[1].flip(-1)
    sources = mask(T1, T2)
    weight = (~sources).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = selective_l1(model(target, sources, torch.tensor([0, 1])), target, weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 5


def test_discriminators_one_per_modality():
    model = ModalityDiscriminators(channels=8, num_layers_d=2)
    assert len(model.discriminators) == M
    sources, image = images(size=32), torch.rand(2, 1, 32, 32) * 2 - 1
    logits = [model(sources, image, j) for j in range(M)]
    assert all(x.shape == logits[0].shape and x.shape[:2] == (2, 1) for x in logits)
    assert not torch.allclose(logits[0], logits[1])
    logits[FLAIR].mean().backward()
    for j, discriminator in enumerate(model.discriminators):
        assert all((p.grad is not None) == (j == FLAIR) for p in discriminator.parameters())


# --- save / load -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unet", "generator", "discriminators", "vae"])
def test_save_pretrained_round_trip(name, tmp_path):
    torch.manual_seed(0)
    x, sources, ids = images(size=32), mask(T1, FLAIR), torch.tensor([1, NULL_DATASET_ID])
    if name == "unet":
        model, latents = tiny_unet(modalities=["t1", "t2", "t1c", "flair", "dwi", "adc"]), torch.randn(2, M, 2, 8, 8)
        run = lambda m: m(latents, torch.tensor([3, 700]), latents, sources, ids).sample  # noqa: E731
    elif name == "generator":
        model = tiny_generator()
        run = lambda m: m(x, sources, ids)  # noqa: E731
    elif name == "discriminators":
        model = ModalityDiscriminators(channels=8, num_layers_d=2)
        run = lambda m: m(x, x[:, FLAIR:FLAIR + 1], FLAIR)  # noqa: E731
    else:
        model = build_vae(block_out_channels=(8, 16, 16))
        model.register_to_config(scaling_factor=0.7)
        run = lambda m: decode_modalities(m, encode_modalities(m, x))  # noqa: E731
    perturb_modulations(model)
    model.eval().save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert public_config(loaded) == public_config(model)
    with torch.no_grad():
        assert torch.equal(run(loaded), run(model))


def test_modules_expose_diffusers_mixins_for_pipeline_loading():
    for module in (unet, gan, wavelet):
        assert hasattr(module, "ModelMixin") and hasattr(module, "ConfigMixin")
    assert vae.build_vae().__class__.__module__.startswith("diffusers")
