"""The ``residual_scale`` of a residual-diffusion config: 1 / std of the residual latents.

The UNet of :class:`~mmdiff.training.stages.LDMStage` diffuses ``latent(y) - latent(mu)`` times
``model.residual_scale``; the noise schedule assumes unit-variance data, so the scale is 1 / the std
of those residuals on training batches (synthesised sequences with ground truth only, the same random
synthesis conditions as training). A new predictor has new residuals: measure again.

    python bench/residual_scale.py pipelines/mmdiff-gan --data ~/.cache/mmdiff/cpu-v2 --batches 40
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mmdiff.data.conditions import SynthesisConditionSampler, loss_weights
from mmdiff.models.vae import encode_modalities
from mmdiff.models.wavelet import HaarWavelet
from mmdiff.pipelines.common import to_network
from mmdiff.pipelines.ldm import predictor_mean_inside_brain
from mmdiff.training.data import training_dataset, training_loader
from mmdiff.training.stages import load_predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predictor", help="a pipeline folder (its generator/) or a generator folder")
    parser.add_argument("--data", required=True, help="the prepared cache the UNet trains on")
    parser.add_argument("--levels", type=int, default=2, help="Haar levels of the latent (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128)
    args = parser.parse_args()

    predictor = load_predictor(args.predictor, "cpu").eval()
    names, modalities = list(predictor.config.dataset_names), list(predictor.config.modalities)
    dataset = training_dataset({"modalities": modalities, "crop": args.crop}, Path(args.data).expanduser(), seed=0,
                               context_slices=predictor.config.context_slices)
    loader, _ = training_loader(dataset, args.batch_size, seed=0)
    conditions = SynthesisConditionSampler("random", modalities=modalities, seed=0)
    latent = HaarWavelet(levels=args.levels)
    total, count = 0.0, 0
    for n, batch in enumerate(loader):
        if n == args.batches:
            break
        x = to_network(batch["images"])
        sources, _ = conditions.batch(batch["available"])
        weight, _ = loss_weights(batch["available"], sources)
        context = to_network(batch["context"]) if "context" in batch else None
        ids = torch.tensor([names.index(dataset.dataset_names[int(d)]) for d in batch["dataset_id"]])
        with torch.no_grad():
            mu = predictor_mean_inside_brain(predictor, predictor(x * sources[:, :, None, None], sources, ids,
                                                                  context=context), batch["brain_mask"])
            residual = encode_modalities(latent, x) - encode_modalities(latent, mu)
        selected = (weight > 0)[:, :, None, None, None].expand_as(residual)
        total += residual[selected].square().sum().item()
        count += int(selected.sum())
    std = (total / count) ** 0.5
    print(f"residual latent std {std:.4f} over {count} values of {min(n, args.batches)} batches: "
          f"residual_scale {1 / std:.2f}")


if __name__ == "__main__":
    main()
