"""The GAN fast path: every missing sequence in one generator pass per slice batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline

from ..data.preprocessing import MRIPreprocessor
from ..models.gan import MultiModalGenerator
from .common import SLICE_MARGIN, ImageInput, MMDiffPipelineOutput, from_network, prepare_inputs, resolve_dataset_id, to_network
from .precision import network_autocast, resolve_precision


class MMGANPipeline(DiffusionPipeline):
    """Synthesise missing MRI sequences with the one-step multi-modal GAN generator.

    Same call as :class:`~mmdiff.pipelines.MMDiffPipeline`. The GAN is deterministic: ``generator``
    and ``num_inference_steps`` are accepted and unused, and ``num_samples`` must be 1 (no
    uncertainty; use the diffusion pipeline for that).

    Args:
        generator: the :class:`~mmdiff.models.MultiModalGenerator`.
        preprocessor: the intensity rule the generator was trained with
            (:class:`~mmdiff.data.preprocessing.MRIPreprocessor`; None: the 99.5th-percentile rule of
            pipelines saved before it was stored).
    """

    engine = "gan"
    model_cpu_offload_seq = "generator"
    _optional_components = ["preprocessor"]

    def __init__(self, generator: MultiModalGenerator, preprocessor: MRIPreprocessor | None = None):
        super().__init__()
        self.register_modules(generator=generator, preprocessor=preprocessor)

    @property
    def downsampling(self) -> int:
        """Slice sides must be multiples of this."""
        return self.generator.size_multiple

    @property
    def context_slices(self) -> int:
        """Axial neighbours on each side the generator reads (2.5D; 0: slice by slice)."""
        return int(self.generator.config.context_slices)

    @property
    def modalities(self) -> list[str]:
        """The sequences the model knows, in its order."""
        return list(self.generator.config.modalities)

    @torch.inference_mode()
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
        slices: Sequence[int] | None = None,
        precision: str = "auto",
        flip_average: bool = False,
    ) -> MMDiffPipelineOutput | tuple:
        """Synthesise ``targets`` from ``images``; arguments as for ``MMDiffPipeline.__call__``.

        ``precision``: ``"auto"`` (bf16 autocast on a CPU with native bf16, else float32),
        ``"float32"`` or ``"bfloat16"``; see :mod:`mmdiff.pipelines.precision`.
        ``flip_average``: also run the generator on every slice mirrored left-right and average the
        two images (:func:`mirrored`): a better image for twice the network time.
        """
        if num_samples != 1:
            raise ValueError("the GAN is deterministic: num_samples must be 1 (MMDiffPipeline gives uncertainty)")
        network = self.generator
        case = prepare_inputs(images, network.config.modalities, targets, brain_mask, self.downsampling,
                              output_type, affine, self.preprocessor, SLICE_MARGIN).only(slices)
        dataset_id = resolve_dataset_id(dataset, network.config.dataset_names)
        device = self._execution_device
        precision = resolve_precision(precision, device)
        source_mask = torch.as_tensor(case.source_mask, device=device)
        target_index = np.flatnonzero(case.target_mask).tolist()
        predictions = case.canvas()

        k = network.config.context_slices
        with self.progress_bar(total=case.num_batches(batch_size)) as progress_bar:
            for index, batch, _ in case.batches(batch_size):
                batch = to_network(batch.to(device=device, dtype=network.dtype))
                context = to_network(case.context(index, k).to(device=device, dtype=network.dtype)) if k else None
                with network_autocast(precision, device):
                    output = network(batch, source_mask, dataset_id, context=context, targets=target_index)
                    if flip_average:
                        output = (output + mirrored(network, batch, source_mask, dataset_id, context, target_index)) / 2
                output = from_network(output.to(batch.dtype))
                case.put(predictions, index, output[:, target_index])
                progress_bar.update()
        self.maybe_free_model_hooks()
        return case.output(predictions, None, return_dict)


def mirrored(network: MultiModalGenerator, batch: torch.Tensor, source_mask: torch.Tensor, dataset_id,
             context: torch.Tensor | None, targets: Sequence[int]) -> torch.Tensor:
    """The generator's output for the slices mirrored left-right, mirrored back.

    The flip is along the first in-plane axis (``X``; left-right in the RAS+ arrays that mmdiff's
    readers and caches hold), of the sources and their axial neighbours alike. A brain's mirror image
    is a brain, so this is a second look at the same slice whose errors are partly its own: the mean
    of the two looks is a better image (higher correlation with the real one, the spread about the
    same; BENCHMARKS.md, session 17), as averaging two models would be, for one more generator pass.
    A hand-written test-time augmentation: diffusers has none for image-to-image.
    """
    flip = (lambda x: x.flip(-2))
    return flip(network(flip(batch), source_mask, dataset_id, context=None if context is None else flip(context),
                        targets=targets))
