"""The GAN fast path: every missing sequence in one generator pass per slice batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline

from ..models.gan import MultiModalGenerator
from .common import ImageInput, MMDiffPipelineOutput, from_network, prepare_inputs, resolve_dataset_id, to_network


class MMGANPipeline(DiffusionPipeline):
    """Synthesise missing MRI sequences with the one-step multi-modal GAN generator.

    Same call as :class:`~mmdiff.pipelines.MMDiffPipeline`. The GAN is deterministic: ``generator``
    and ``num_inference_steps`` are accepted and unused, and ``num_samples`` must be 1 (no
    uncertainty; use the diffusion pipeline for that).

    Args:
        generator: the :class:`~mmdiff.models.MultiModalGenerator`.
    """

    engine = "gan"
    model_cpu_offload_seq = "generator"

    def __init__(self, generator: MultiModalGenerator):
        super().__init__()
        self.register_modules(generator=generator)

    @property
    def downsampling(self) -> int:
        """How much the generator shrinks a slice side."""
        return 2 ** (len(self.generator.config.block_out_channels) - 1)

    @property
    def modalities(self) -> list[str]:
        """The sequences the model knows, in its order."""
        return list(self.generator.config.modalities)

    @torch.no_grad()
    def __call__(
        self,
        images: Mapping[str, ImageInput],
        dataset: str | None = None,
        targets: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_samples: int = 1,
        output_type: str = "np",
        brain_mask: ImageInput | None = None,
        batch_size: int = 8,
        affine: np.ndarray | None = None,
        return_dict: bool = True,
    ) -> MMDiffPipelineOutput | tuple:
        """Synthesise ``targets`` from ``images``; arguments as for ``MMDiffPipeline.__call__``."""
        if num_samples != 1:
            raise ValueError("the GAN is deterministic: num_samples must be 1 (MMDiffPipeline gives uncertainty)")
        network = self.generator
        case = prepare_inputs(images, network.config.modalities, targets, brain_mask, self.downsampling,
                              output_type, affine)
        dataset_id = resolve_dataset_id(dataset, network.config.dataset_names)
        device = self._execution_device
        source_mask = torch.as_tensor(case.source_mask, device=device)
        target_index = np.flatnonzero(case.target_mask).tolist()
        predictions = case.canvas()

        with self.progress_bar(total=case.num_batches(batch_size)) as progress_bar:
            for index, batch, _ in case.batches(batch_size):
                batch = to_network(batch.to(device=device, dtype=network.dtype))
                output = from_network(network(batch, source_mask, dataset_id))
                case.put(predictions, index, output[:, target_index])
                progress_bar.update()
        self.maybe_free_model_hooks()
        return case.output(predictions, None, return_dict)
