import torch
from monai.metrics import PSNRMetric, SSIMMetric

from mmdiff.evaluation import mae, psnr, ssim


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(3, 48, 48, generator=g)
    pred = (target + 0.1 * torch.randn(3, 48, 48, generator=g)).clamp(0, 1)
    return pred, target


def test_unmasked_equals_monai():
    pred, target = _pair()
    torch.testing.assert_close(psnr(pred, target), PSNRMetric(1.0)(pred[:, None], target[:, None]).ravel())
    torch.testing.assert_close(ssim(pred, target), SSIMMetric(2, 1.0)(pred[:, None], target[:, None]).ravel())


def test_mask_restricts_the_score_to_the_brain():
    pred, target = _pair()
    mask = torch.zeros(3, 48, 48, dtype=torch.bool)
    mask[:, 12:36, 12:36] = True
    # outside the brain: empty in both, perfectly "predicted" -> inflates whole-image scores
    pred, target = pred * mask, target * mask
    assert ssim(pred, target).mean() > ssim(pred, target, mask).mean()
    assert psnr(pred, target).mean() > psnr(pred, target, mask).mean()
    # an error outside the mask does not change the masked score
    spoiled = pred.clone()
    spoiled[:, :5, :5] = 1.0
    torch.testing.assert_close(psnr(spoiled, target, mask), psnr(pred, target, mask))
    torch.testing.assert_close(mae(spoiled, target, mask), mae(pred, target, mask))


def test_pooled_is_one_number_over_all_masked_pixels():
    pred, target = _pair()
    assert mae(pred, target, pooled=True).shape == ()
    torch.testing.assert_close(mae(pred, target, pooled=True), (pred - target).abs().mean())
    assert psnr(target, target).min() > 100 and torch.allclose(ssim(target, target), torch.ones(3))
