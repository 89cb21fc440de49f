"""Selective supervision: missing ground truth never reaches a loss or a gradient."""

from __future__ import annotations

import pytest
import torch

from mmdiff.data.conditions import loss_weights
from mmdiff.losses import (
    discriminator_loss,
    generator_loss,
    latent_diffusion_loss,
    lsgan_loss,
    selective_l1,
    selective_ssim_loss,
    vae_adversarial_loss,
    vae_loss,
)
from mmdiff.models import ModalityDiscriminators, MultiModalGenerator, build_vae

M = 6
T1, T2, T1C, FLAIR, DWI, ADC = range(M)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_selective_l1_is_the_weighted_mean_over_supervised_pairs():
    pred, target = randn(2, M, 4, 4, seed=1), randn(2, M, 4, 4, seed=2)
    weight = torch.zeros(2, M)
    weight[0, T1], weight[1, T2], weight[1, ADC] = 1.0, 1.0, 2.0
    error = (pred - target).abs().mean((2, 3))
    expected = (error[0, T1] + error[1, T2] + 2 * error[1, ADC]) / 4
    torch.testing.assert_close(selective_l1(pred, target, weight), expected)


@pytest.mark.parametrize("loss_fn, shape", [(selective_l1, (2, M, 8, 8)), (latent_diffusion_loss, (2, M, 4, 4, 4))])
def test_missing_ground_truth_gives_zero_loss_and_gradient(loss_fn, shape):
    available = torch.tensor([[1, 1, 0, 1, 0, 0]] * 2, dtype=torch.bool)
    sources = torch.tensor([[1, 0, 0, 0, 0, 0]] * 2, dtype=torch.bool)
    synthesis, _ = loss_weights(available, sources)
    pred, target = randn(*shape, seed=1).requires_grad_(), randn(*shape, seed=2).requires_grad_()
    loss = loss_fn(pred, target, synthesis)
    loss.backward()
    missing = ~available
    assert (pred.grad[missing] == 0).all() and (target.grad[missing] == 0).all()
    assert (pred.grad[available & ~sources] != 0).any()

    # whatever stands in for a missing sequence (here NaN) changes nothing
    polluted = target.detach().clone()
    polluted[missing] = float("nan")
    pred2 = pred.detach().clone().requires_grad_()
    loss2 = loss_fn(pred2, polluted, synthesis)
    loss2.backward()
    assert loss2.item() == loss.item()
    assert torch.equal(pred2.grad, pred.grad)


def test_no_supervised_pair_gives_zero_with_a_graph():
    pred = randn(2, M, 4, 4).requires_grad_()
    loss = selective_l1(pred, torch.zeros_like(pred), torch.zeros(2, M))
    loss.backward()
    assert loss.item() == 0 and (pred.grad == 0).all()
    with pytest.raises(ValueError, match=r"weight \(2, 5\) does not match pred \(2, 6, 4, 4\)"):
        selective_l1(pred, pred, torch.ones(2, M - 1))


def test_generator_loss_weights_and_terms():
    pred, target = randn(2, M, 8, 8, seed=1), randn(2, M, 8, 8, seed=2)
    available = torch.tensor([[1, 1, 1, 0, 0, 0]] * 2, dtype=torch.bool)
    sources = torch.tensor([[1, 0, 0, 0, 0, 0]] * 2, dtype=torch.bool)
    synthesis, reconstruction = loss_weights(available, sources)
    fake_logits = {T2: torch.full((2, 1, 3, 3), 0.5), T1C: torch.full((2, 1, 3, 3), 0.0)}
    terms = generator_loss(pred, target, synthesis, reconstruction, fake_logits)
    torch.testing.assert_close(terms["synthesis_l1"], (pred - target)[:, [T2, T1C]].abs().mean())
    torch.testing.assert_close(terms["reconstruction_l1"], (pred - target)[:, T1].abs().mean())
    torch.testing.assert_close(terms["adversarial"], torch.tensor((0.25 + 1.0) / 2))
    torch.testing.assert_close(
        terms["loss"], 100 * terms["synthesis_l1"] + 30 * terms["reconstruction_l1"] + terms["adversarial"]
    )
    # a modality without ground truth is left out of the adversarial term too
    with_missing = {**fake_logits, FLAIR: torch.full((2, 1, 3, 3), -9.0)}
    assert generator_loss(pred, target, synthesis, reconstruction, with_missing)["adversarial"] == terms["adversarial"]
    assert generator_loss(pred, target, synthesis, reconstruction)["adversarial"] == 0


def test_ssim_term_is_one_minus_the_evaluations_brain_ssim_of_the_supervised_pairs():
    """``lambda_ssim``: the term is 1 - the evaluation's own SSIM (inside the brain, data range 2 for
    [-1, 1] images) over the supervised pairs only; exact images cost nothing, a blurred one does though
    its L1 is small; a pair without ground truth gets no gradient; pixels more than half a window
    outside the brain change nothing; left at 0 the generator loss is as it was."""
    from mmdiff.evaluation.metrics import ssim

    target = randn(2, M, 32, 32, seed=2).clamp(-1, 1)
    pred = torch.nn.functional.avg_pool2d(target, 3, stride=1, padding=1, count_include_pad=False).requires_grad_()
    weight = torch.zeros(2, M)
    weight[0, T2] = 1.0
    brain = torch.zeros(2, 32, 32)
    brain[:, 8:24, 6:26] = 1
    term = selective_ssim_loss(pred, target, weight, brain)
    expected = 1 - ssim(pred[0, T2][None], target[0, T2][None], brain[:1], data_range=2.0)[0]
    torch.testing.assert_close(term, expected)
    assert term > 0.2 and (pred - target)[0, T2].abs().mean() < 0.6
    assert selective_ssim_loss(target, target, weight, brain) == 0
    term.backward()
    assert (pred.grad[0, T2] != 0).any() and (pred.grad[1] == 0).all() and (pred.grad[0, T1] == 0).all()
    far = pred.detach().clone()
    far[0, T2, :2] = 5.0  # rows 0-1: over five pixels from the brain's first row (8)
    torch.testing.assert_close(selective_ssim_loss(far, target, weight, brain), term.detach())

    plain = generator_loss(pred, target, weight, torch.zeros(2, M))
    assert "synthesis_ssim" not in plain
    both = generator_loss(pred, target, weight, torch.zeros(2, M), lambda_ssim=20.0, brain=brain)
    torch.testing.assert_close(both["synthesis_ssim"], term)
    torch.testing.assert_close(both["loss"], plain["loss"] + 20 * term)


def test_discriminator_loss_lsgan():
    real, fake = torch.ones(2, 1, 3, 3), torch.zeros(2, 1, 3, 3)
    assert discriminator_loss(real, fake)["loss"] == 0
    terms = discriminator_loss(fake, real)
    assert terms["real"] == 1 and terms["fake"] == 1 and terms["loss"] == 1
    weight = torch.zeros(2, M)
    weight[:, T2] = 1
    terms = discriminator_loss({T2: real, FLAIR: fake}, {T2: fake, FLAIR: real}, weight)
    assert terms["loss"] == 0  # FLAIR (weight 0) would be wrong on both, but does not count
    assert lsgan_loss(torch.full((1, 1, 2, 2), 3.0), target_is_real=True) == 4


def test_gan_step_ignores_missing_ground_truth():
    """One generator step: the missing modalities' placeholders do not change any gradient."""
    torch.manual_seed(0)
    generator = MultiModalGenerator(num_datasets=2, block_out_channels=(8, 16), layers_per_block=1,
                                    embedding_dim=8, norm_num_groups=4)
    discriminators = ModalityDiscriminators(channels=8, num_layers_d=2)
    images = randn(2, M, 16, 16, seed=3).clamp(-1, 1)
    available = torch.tensor([[1, 1, 0, 1, 0, 0]] * 2, dtype=torch.bool)
    sources = torch.tensor([[1, 0, 0, 0, 0, 0]] * 2, dtype=torch.bool)
    synthesis, reconstruction = loss_weights(available, sources)

    def gradients(target):
        generator.zero_grad()
        inputs = target * sources[:, :, None, None]  # x_i = y_i * sc_i
        fake = generator(inputs, sources, torch.tensor([0, 1]))
        logits = {j: discriminators(inputs, fake[:, j : j + 1], j) for j in range(M) if synthesis[:, j].any()}
        generator_loss(fake, target, synthesis, reconstruction, logits)["loss"].backward()
        return [p.grad.clone() for p in generator.parameters() if p.grad is not None]

    placeholder = images.clone()
    placeholder[~available] = 0.0
    other = images.clone()
    other[~available] = 0.9
    for a, b in zip(gradients(placeholder), gradients(other), strict=True):
        assert torch.equal(a, b)


def test_vae_loss_terms():
    model = build_vae(block_out_channels=(8, 16), mid_block_add_attention=False)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    posterior = model.encode(x).latent_dist
    perfect = vae_loss(x, x, posterior)
    assert perfect["l1"] == 0 and perfect["ssim"].abs() < 1e-5
    torch.testing.assert_close(perfect["kl"], posterior.kl().mean())
    terms = vae_loss(model.decode(posterior.sample()).sample, x, posterior, kl_weight=1e-3, ssim_weight=0.5)
    torch.testing.assert_close(terms["loss"], terms["l1"] + 0.5 * terms["ssim"] + 1e-3 * terms["kl"])
    assert 0 < terms["ssim"] <= 2
    terms["loss"].backward()
    assert model.encoder.conv_in.weight.grad is not None


def test_vae_adversarial_warm_up_gate():
    logits = torch.zeros(2, 1, 3, 3, requires_grad=True)
    assert vae_adversarial_loss(logits, step=9, start_step=10) == 0
    assert vae_adversarial_loss(logits, step=10, start_step=10, weight=0.1).item() == pytest.approx(0.1)
