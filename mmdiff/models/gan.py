"""The GAN fast path: a multi-modal generator with PFM, and one PatchGAN discriminator per modality.

Generator layout (after PMM-Synth), at every resolution level:

- a common encoder stream over the stacked, masked images plus one mask plane per modality (and,
  with ``context_slices = k``, the ``k`` axial neighbours on each side of every source: 2.5D input,
  so that neighbouring output slices agree and the network sees the lesion's extent through the slab);
- with ``modality_streams`` (PMM-Synth's layout), a modality-specific encoder stream per *source*
  modality (encoders of absent modalities are not run, so they get no gradient; in a batch whose
  samples differ in sources, the encoders of a modality run on the whole batch and the samples
  without it are masked out of the fusion), fused with the common stream by masked mean and masked
  max over the source streams, concatenated with the common stream and mixed by a 1x1 conv;
  without them (the lean layout), the common stream alone is the fused representation;
- a modality-specific decoder per output modality, a U-Net decoder over the fused levels, ending in
  tanh; or, with ``shared_decoder``, one decoder whose last layer has a channel per modality.

The lean layout (``modality_streams=False, shared_decoder=True``) is one U-Net: per slice it costs a
fraction of the PMM-Synth layout's FLOPs (which run ``2 M + 1`` encoder/decoder towers), which is what
makes a whole volume run in seconds on a CPU.

Every conv block is conv -> GroupNorm -> PFM (``F * (1 + gamma) + beta`` from the dataset embedding)
-> SiLU. The network is fully convolutional: train on crops, run on whole slices whose sides are
divisible by ``2 ** (len(block_out_channels) - 1)``.

No library has this generator, so it is written here; the discriminators are MONAI's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..modalities import MODALITIES
from .pfm import NULL_DATASET_ID, check_dataset_names, DatasetEmbedding, FeatureModulation


class SubsetConv2d(nn.Conv2d):
    """A conv that can be given only some of its input channels (the others being zero), and asked
    for only some of its output channels.

    ``conv(x, in_channels=idx)`` with ``x`` holding input channels ``idx`` equals ``conv(full)`` where
    ``full`` has ``x`` at ``idx`` and zeros elsewhere, without the zeros' multiply-adds;
    ``out_channels=idx`` gives ``conv(x)[:, idx]`` without working out the others. The subsets are
    taken inside the module's own forward, so hooks on the conv (layerwise casting, offloading) still
    see the call."""

    def forward(self, x: torch.Tensor, in_channels: torch.Tensor | None = None,
                out_channels: torch.Tensor | None = None) -> torch.Tensor:
        if in_channels is None and out_channels is None:
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if in_channels is not None:
            weight = weight[:, in_channels]
        if out_channels is not None:
            weight, bias = weight[out_channels], None if bias is None else bias[out_channels]
        return self._conv_forward(x, weight, bias)


class ModulatedConvBlock(nn.Module):
    """3x3 conv (stride 1 or 2) -> GroupNorm -> PFM -> SiLU."""

    def __init__(
        self, in_channels: int, out_channels: int, embedding_dim: int, norm_num_groups: int, stride: int = 1
    ):
        super().__init__()
        self.conv = SubsetConv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(norm_num_groups, out_channels)
        self.modulation = FeatureModulation(embedding_dim, out_channels)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor,
                in_channels: torch.Tensor | None = None) -> torch.Tensor:
        """``in_channels``: which of the conv's input channels ``x`` holds (see :class:`SubsetConv2d`)."""
        x = self.conv(x) if in_channels is None else self.conv(x, in_channels=in_channels)
        return self.act(self.modulation(self.norm(x), embedding))


class Encoder(nn.Module):
    """A stack of levels; level ``k`` has ``layers_per_block`` blocks, the first strided for ``k > 0``.

    Returns the features of every level, finest first.
    """

    def __init__(self, in_channels: int, block_out_channels: Sequence[int], layers_per_block: int,
                 embedding_dim: int, norm_num_groups: int):
        super().__init__()
        self.levels = nn.ModuleList()
        for level, channels in enumerate(block_out_channels):
            stride = 1 if level == 0 else 2
            blocks = [ModulatedConvBlock(in_channels, channels, embedding_dim, norm_num_groups, stride)]
            blocks += [
                ModulatedConvBlock(channels, channels, embedding_dim, norm_num_groups)
                for _ in range(layers_per_block - 1)
            ]
            self.levels.append(nn.ModuleList(blocks))
            in_channels = channels

    def forward(self, x: torch.Tensor, embedding: torch.Tensor,
                in_channels: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``in_channels``: which of the first conv's input channels ``x`` holds (default: all)."""
        features = []
        for blocks in self.levels:
            for block in blocks:
                x = block(x, embedding, in_channels)
                in_channels = None
            features.append(x)
        return features


class Decoder(nn.Module):
    """U-Net decoder over fused levels (finest first) -> ``out_channels`` image channels in [-1, 1].

    With ``patch_size > 1`` the finest level is ``patch_size`` times coarser than the image and a
    pixel shuffle unfolds it. Predicting each of a patch's pixels by its own 1 x 1 weights leaves a
    period-``patch_size`` checkerboard (fine lines in a sagittal view); ``refine_channels > 0``
    unfolds features instead and lets a 3 x 3 conv at full resolution draw the pixels, so
    neighbouring pixels come from shared weights (the sub-pixel conv of ESPCN with a refinement).
    The unfolded features themselves still alternate from pixel to pixel, and a trained model passes
    some of that on (a faint period-2 mesh, BENCHMARKS.md session 8); ``refine_blur`` low-passes them
    with a fixed [1 2 1] x [1 2 1] / 16 filter first, whose response at period 2 is zero: a linear
    conv cannot create a frequency its input lacks, so the mesh cannot reach the output (only the
    pointwise SiLU and tanh could add harmonics).

    That low-pass also takes the finest detail out of reach: nothing at the image's own 1-2 pixel scale
    (vessel walls, cortical ribbon, noise texture) can come from the features. ``detail_sources = S``
    gives it back from the inputs: every output channel ``j`` adds ``sum_i a_ij * hp(x_i)``, where
    ``hp(x_i) = x_i - blur(x_i)`` is source ``i``'s own fine detail (the same [1 2 1] filter) and the
    coefficient maps ``a_ij`` come from the (low-passed) features by a 1 x 1 conv: how much of which
    source's detail, with which sign, belongs in target ``j`` here. A per-voxel regression copies
    such detail for free, and beat the network on SSIM where the targets share the sources' detail
    (BENCHMARKS.md, session 11). The coefficients are smooth and the detail is the image's own, so
    no patch mesh comes back. The coefficient layer starts at zero: an older model loaded into this
    layout gives exactly its old output until it is trained.

    ``detail_bands = n > 1`` transfers coarser detail too, band by band of the à trous (starlet)
    decomposition with the same filter: ``c_0 = x``, ``c_k = blur_k(c_{k-1})`` with the filter's taps
    ``2^(k-1)`` pixels apart, band ``w_k = c_{k-1} - c_k`` (band 1 is ``hp`` above; band 2 holds the
    2-4 pixel scales: sulci, the cortical ribbon, small lesions' edges). Each band has its own
    coefficient maps, from its own zero-initialised 1 x 1 conv, so a model trained with fewer bands
    loads and gives its old output. A per-voxel regression keeps the sources' texture at every scale;
    the one-band network was still smoother than it at 2-5 pixels (BENCHMARKS.md, session 12).

    ``detail_base = True`` transfers what the bands leave, too: the base ``c_n``, the source's low-pass
    below the coarsest band, with its own zero-initialised coefficient maps. The bands and the base sum
    back to the source (``x = w_1 + .. + w_n + c_n``), so the transfer then spans the whole image: a
    per-voxel linear map of the sources, ``sum_i b_ij * x_i``, which is the voxelwise regression's own
    form, with coefficients that vary smoothly in space and are drawn per slice. Shading that the
    target shares with its sources (a coil's bias field, a subject's own grey-white contrast) could
    pass through that map instead of being drawn from what the training subjects had: the network's
    errors on the held-out cases it trailed the regression on were largest at scales over 6 pixels.
    Added to a trained model and fine-tuned 1500 steps, its coefficients stayed near zero and nothing
    changed (BENCHMARKS.md, session 22): the path is there for a model trained with it from the start.
    A model without it loads and gives its old output.

    Detail transfer only moves detail the sources have. What a target has and no source has at the
    1-3 pixel scale, the thin enhancing rim of a glioblastoma on T1C or an enhancing vessel, the
    low-passed features cannot draw at that scale. ``fine_channels = F > 0`` adds a small head at full
    resolution: ``y += c(SiLU(b(SiLU(a([x, sources])))))``, three 3 x 3 convs over the low-passed
    features ``x`` and the (masked) source images, ``F`` channels wide, which can put a rim where the
    coarse path puts it, as thin as the image's pixels, along the sources' own edges. Its inputs have
    no patch-period energy (``x`` is low-passed; the sources are the image's own), so it brings no
    mesh back. Its last conv starts at zero: an older model loaded into this layout gives exactly its
    old output until it is trained. (2000 CPU steps from the published model did not teach it the
    rim, which that model also misses on the cases it was trained on: BENCHMARKS.md, session 16.)
    """

    def __init__(self, block_out_channels: Sequence[int], layers_per_block: int, embedding_dim: int,
                 norm_num_groups: int, out_channels: int = 1, patch_size: int = 1, refine_channels: int = 0,
                 refine_blur: bool = False, detail_sources: int = 0, detail_bands: int = 1, detail_base: bool = False,
                 fine_channels: int = 0, fine_sources: int = 0):
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.levels = nn.ModuleList()
        for level in reversed(range(len(block_out_channels) - 1)):
            channels = block_out_channels[level]
            in_channels = block_out_channels[level + 1] + channels  # upsampled coarser level + skip
            blocks = [ModulatedConvBlock(in_channels, channels, embedding_dim, norm_num_groups)]
            blocks += [
                ModulatedConvBlock(channels, channels, embedding_dim, norm_num_groups)
                for _ in range(layers_per_block - 1)
            ]
            self.levels.append(nn.ModuleList(blocks))
        area = patch_size ** 2
        self.conv_out = nn.Conv2d(block_out_channels[0], (refine_channels or out_channels) * area, 1)
        self.fold = nn.PixelShuffle(patch_size)
        if refine_channels:
            self.refine = nn.Sequential(nn.SiLU(), nn.Conv2d(refine_channels, out_channels, 3, padding=1))
        if refine_blur:
            if not refine_channels:
                raise ValueError("refine_blur needs refine_channels > 0 (it filters the unfolded features)")
            taps = torch.tensor([1.0, 2.0, 1.0])
            self.register_buffer("blur", (taps[:, None] * taps[None, :] / 16).expand(refine_channels, 1, 3, 3).clone(),
                                 persistent=False)
        if detail_sources:
            if not (refine_channels and refine_blur):
                raise ValueError("detail transfer needs refine_channels > 0 and refine_blur (its coefficients "
                                 "come from the low-passed full-resolution features)")
            self.out_channels, self.detail_sources = out_channels, detail_sources
            if detail_bands < 1:
                raise ValueError(f"detail_bands must be >= 1, got {detail_bands}")
            self.detail = nn.Conv2d(refine_channels, out_channels * detail_sources, 1)
            self.detail_coarser = nn.ModuleList(nn.Conv2d(refine_channels, out_channels * detail_sources, 1)
                                                for _ in range(detail_bands - 1))
            if detail_base:
                self.detail_base = nn.Conv2d(refine_channels, out_channels * detail_sources, 1)
            for conv in [self.detail, *self.detail_coarser, *([self.detail_base] if detail_base else [])]:
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
        elif detail_base:
            raise ValueError("detail_base needs detail transfer (it is the transfer's coarsest part)")
        if fine_channels:
            if not (refine_channels and refine_blur and fine_sources):
                raise ValueError("the full-resolution head needs refine_channels > 0, refine_blur and the sources")
            self.fine_in = SubsetConv2d(refine_channels + fine_sources, fine_channels, 3, padding=1)
            self.fine_mid = nn.Conv2d(fine_channels, fine_channels, 3, padding=1)
            self.fine_out = SubsetConv2d(fine_channels, out_channels, 3, padding=1)
            nn.init.zeros_(self.fine_out.weight)
            nn.init.zeros_(self.fine_out.bias)

    def low_pass(self, x: torch.Tensor, dilation: int = 1) -> torch.Tensor:
        """The fixed [1 2 1] x [1 2 1] / 16 filter (taps ``dilation`` pixels apart), channel by channel,
        edges replicated."""
        return F.conv2d(F.pad(x, (dilation,) * 4, mode="replicate"),
                        self.blur[:1].to(x.dtype).expand(x.shape[1], -1, -1, -1), groups=x.shape[1], dilation=dilation)

    def detail_bands(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The à trous bands ``w_1 .. w_n`` of ``x``, finest first (``n = 1 + len(detail_coarser)``)."""
        bands, coarse = [], x
        for k in range(1 + len(self.detail_coarser)):
            smoother = self.low_pass(coarse, dilation=2 ** k)
            bands.append(coarse - smoother)
            coarse = smoother
        return bands

    def forward(self, fused: list[torch.Tensor], embedding: torch.Tensor, sources: torch.Tensor | None = None,
                targets: Sequence[int] | None = None, present: Sequence[int] | None = None) -> torch.Tensor:
        """``sources`` ``[B, S, H, W]`` (the masked inputs, absent ones zero) feed the detail transfer
        and the full-resolution head; both are worked out only for the output channels ``targets``
        (default: all; the others get none) and the source channels ``present`` (default: all; an
        absent source adds nothing anyway), which makes them several times cheaper in a pipeline
        that asks for three targets from three sources."""
        x = fused[-1]
        for blocks, skip in zip(self.levels, reversed(fused[:-1])):
            x = torch.cat([self.upsample(x), skip], dim=1)
            for block in blocks:
                x = block(x, embedding)
        x = self.fold(self.conv_out(x))
        if hasattr(self, "blur"):  # no period-2 energy left for the (linear) 3 x 3 conv to pass on
            x = self.low_pass(x)
        y = self.refine(x) if hasattr(self, "refine") else x
        outs = list(range(y.shape[1])) if targets is None else sorted(set(targets))
        index = torch.as_tensor(outs, device=y.device)  # the output channels both heads add to
        if sources is not None:  # the source channels both heads read
            ins = list(range(sources.shape[1])) if present is None else sorted(set(present))
        if hasattr(self, "fine_in"):
            if sources is None or x.shape[1] + sources.shape[1] != self.fine_in.in_channels:
                raise ValueError("the full-resolution head needs the source planes")
            channels = torch.as_tensor(list(range(x.shape[1])) + [x.shape[1] + i for i in ins], device=x.device)
            h = F.silu(self.fine_in(torch.cat([x, sources[:, ins]], dim=1), in_channels=channels))
            h = F.silu(self.fine_mid(h))
            y = y.index_add(1, index, self.fine_out(h, out_channels=index).to(y.dtype))
        if hasattr(self, "detail"):
            if sources is None or sources.shape[1] != self.detail_sources:
                raise ValueError(f"detail transfer needs the {self.detail_sources} source planes")
            detail, convs, bands = 0, [self.detail, *self.detail_coarser], self.detail_bands(sources[:, ins])
            if hasattr(self, "detail_base"):  # the base: what the bands leave of each source
                convs.append(self.detail_base)
                bands.append(sources[:, ins] - sum(bands))
            for conv, band in zip(convs, bands):
                weight = conv.weight.view(self.out_channels, self.detail_sources, -1)[outs][:, ins]
                bias = conv.bias.view(self.out_channels, self.detail_sources)[outs][:, ins]
                coefficients = F.conv2d(x, weight.flatten(0, 1)[:, :, None, None], bias.flatten())
                detail = detail + (coefficients.unflatten(1, (len(outs), len(ins))) * band[:, None]).sum(2)
            y = y.index_add(1, index, detail.to(y.dtype))
        return torch.tanh(y)


class MultiModalGenerator(ModelMixin, ConfigMixin):
    """Any subset of modalities in, every modality out, in one pass.

    Args:
        modalities: the modality list, in order (its length is ``M``).
        num_datasets: number of known datasets (id ``-1`` is the null dataset).
        dataset_names: the datasets' names in id order (stored so a pipeline can map names to ids);
            when given, ``num_datasets`` must be its length.
        block_out_channels: widths of the resolution levels, finest first; ``len - 1`` downsamplings.
        layers_per_block: conv blocks per level, in every encoder and decoder.
        embedding_dim: size of the PFM dataset embedding.
        norm_num_groups: GroupNorm groups (must divide every width).
        use_pfm: if False (the PFM ablation), every sample gets the null dataset's embedding whatever
            its dataset id, so the modulation is one learned scale and shift shared by all sites.
        modality_streams: PMM-Synth's per-modality encoder streams and their fusion (False: the
            common stream only).
        shared_decoder: one decoder with a channel per modality instead of one decoder each.
        context_slices: axial neighbours on each side of every source fed to the common stream (2.5D).
        patch_size: the network runs on ``patch_size x patch_size`` patches folded into channels
            (pixel unshuffle in, pixel shuffle out), so every level costs ``patch_size ** 2`` times
            less; the last layer still predicts each pixel.
        refine_channels: with ``patch_size > 1``, the decoder unfolds this many feature channels and
            a 3 x 3 conv at full resolution draws the image from them (0: the unfolded channels are
            the image, which leaves a patch-sized checkerboard; see :class:`Decoder`).
        refine_blur: low-pass the unfolded features before that conv (no period-2 mesh; see :class:`Decoder`).
        detail_transfer: add the sources' own fine detail, weighted per voxel by coefficients the
            decoder draws (see :class:`Decoder`); needs ``refine_channels`` and ``refine_blur``.
        detail_bands: how many à trous bands of the sources' detail it transfers (1: the 1-2 pixel
            scale only; 2 adds the 2-4 pixel scale; see :class:`Decoder`).
        detail_base: transfer the sources' low-pass below the bands too, so the transfer is a per-voxel
            linear map of the whole sources (the voxelwise regression's form; see :class:`Decoder`).
        fine_channels: width of a small full-resolution head over the low-passed features and the
            sources, which draws what no source has at the pixel scale (a thin enhancing rim; 0: none;
            see :class:`Decoder`); needs ``refine_channels`` and ``refine_blur``.
        inside_brain: the weights were trained to be right inside the brain mask only (the GAN stage's
            ``model.inside_brain``: its losses saw the output as a pipeline returns it, background
            outside the mask), so what they draw outside it means nothing. The network is the same
            either way; whoever uses its output beyond a pipeline's, as the diffusion engine uses its
            predictor's, takes it inside the brain (:func:`~mmdiff.pipelines.common.inside_brain`).
    """

    @register_to_config
    def __init__(
        self,
        modalities: Sequence[str] = MODALITIES,
        num_datasets: int = 4,
        dataset_names: Sequence[str] | None = None,
        block_out_channels: Sequence[int] = (16, 32, 64, 128),
        layers_per_block: int = 1,
        embedding_dim: int = 128,
        norm_num_groups: int = 8,
        use_pfm: bool = True,
        modality_streams: bool = True,
        shared_decoder: bool = False,
        context_slices: int = 0,
        patch_size: int = 1,
        refine_channels: int = 0,
        refine_blur: bool = False,
        detail_transfer: bool = False,
        detail_bands: int = 1,
        detail_base: bool = False,
        fine_channels: int = 0,
        inside_brain: bool = False,
    ):
        super().__init__()
        check_dataset_names(num_datasets, dataset_names)
        if context_slices < 0:
            raise ValueError(f"context_slices must be >= 0, got {context_slices}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        num_modalities = len(modalities)
        area = patch_size ** 2
        levels = dict(block_out_channels=block_out_channels, layers_per_block=layers_per_block,
                      embedding_dim=embedding_dim, norm_num_groups=norm_num_groups)
        self.dataset_embedding = DatasetEmbedding(num_datasets, embedding_dim)
        if modality_streams:
            self.modality_encoders = nn.ModuleList(Encoder(area, **levels) for _ in range(num_modalities))
            self.fusion = nn.ModuleList(nn.Conv2d(3 * channels, channels, 1) for channels in block_out_channels)
        self.common_encoder = Encoder((2 + 2 * context_slices) * num_modalities * area, **levels)
        if refine_channels < 0:
            raise ValueError(f"refine_channels must be >= 0, got {refine_channels}")
        output = dict(patch_size=patch_size, refine_channels=refine_channels, refine_blur=refine_blur,
                      detail_sources=num_modalities if detail_transfer else 0, detail_bands=detail_bands,
                      detail_base=detail_base, fine_channels=fine_channels,
                      fine_sources=num_modalities if fine_channels else 0)
        if shared_decoder:
            self.decoder = Decoder(**levels, **output, out_channels=num_modalities)
        else:
            self.modality_decoders = nn.ModuleList(Decoder(**levels, **output) for _ in range(num_modalities))
        self.unfold = nn.PixelUnshuffle(patch_size)

    @property
    def size_multiple(self) -> int:
        """Slice sides must be multiples of this."""
        return self.config.patch_size * 2 ** (len(self.config.block_out_channels) - 1)

    def forward(self, images: torch.Tensor, source_mask: torch.Tensor, dataset_id: torch.Tensor | int,
                context: torch.Tensor | None = None, targets: Sequence[int] | None = None) -> torch.Tensor:
        """Images ``[B, M, H, W]`` in [-1, 1] (non-sources are zeroed here), source mask ``[B, M]``,
        dataset ids ``[B]`` or an int (``-1``: null) -> every modality ``[B, M, H, W]`` in [-1, 1].

        ``context`` ``[B, M, 2k, H, W]``: the ``k = context_slices`` axial neighbours below and above
        each slice (order ``-k .. -1, +1 .. +k``; zeros beyond the volume), for a 2.5D model; left
        out, each neighbour is taken to equal the slice itself. ``targets`` (modality indices) limits
        which per-modality decoders run (the shared decoder: which channels get the detail transfer);
        the other channels come back as -1 (background) from either layout.
        """
        batch, num_modalities, height, width = images.shape
        if num_modalities != len(self.config.modalities):
            raise ValueError(
                f"images have {num_modalities} modalities, the model expects {len(self.config.modalities)}"
            )
        multiple = self.size_multiple
        if height % multiple or width % multiple:
            raise ValueError(f"image size {height}x{width} is not divisible by {multiple}")
        mask = torch.as_tensor(source_mask, device=images.device).bool().expand(batch, num_modalities)
        if not mask.any(dim=1).all():
            raise ValueError("every sample needs at least one source modality")
        mask_planes = mask.to(images.dtype)[:, :, None, None].expand_as(images)
        images = images * mask_planes
        dataset_id = torch.as_tensor(dataset_id, device=images.device).long().expand(batch)
        if not self.config.use_pfm:
            dataset_id = torch.full_like(dataset_id, NULL_DATASET_ID)
        embedding = self.dataset_embedding(dataset_id, images.dtype)

        k = self.config.context_slices
        present = mask.any(dim=0).nonzero().flatten().tolist()  # a source no row has adds no detail
        if k:
            if context is None:
                context = images[:, :, None].expand(-1, -1, 2 * k, -1, -1)
            elif context.shape != (batch, num_modalities, 2 * k, height, width):
                raise ValueError(f"context has shape {tuple(context.shape)}, expected "
                                 f"{(batch, num_modalities, 2 * k, height, width)}")
        # only the planes of sources some row has: the others are zero (image, context and mask plane)
        planes = [images[:, present]]
        if k:
            planes.append((context * mask_planes[:, :, None])[:, present].flatten(1, 2))
        planes.append(mask_planes[:, present])
        common = self.common_encoder(self.unfold(torch.cat(planes, dim=1)), embedding,
                                     self._input_channels(present, images.device))
        fused = common if not self.config.modality_streams else self._fuse(images, mask, common, embedding)

        if self.config.shared_decoder:
            out = self.decoder(fused, embedding, images, targets, present)
            if targets is not None:  # the channels not asked for: background, as the per-modality decoders give
                others = [i for i in range(num_modalities) if i not in set(targets)]
                out[:, others] = -1.0
            return out
        wanted = range(num_modalities) if targets is None else sorted(set(targets))
        out = images.new_full((batch, num_modalities, height, width), -1.0)
        for i in wanted:
            out[:, i:i + 1] = self.modality_decoders[i](fused, embedding, images, None, present)
        return out

    def _input_channels(self, present: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The common encoder's input channels that the planes of the ``present`` sources fill, in
        the order :meth:`forward` stacks them (None: all of them).

        The full input is ``M`` images, ``M x 2k`` context planes (modality-major) and ``M`` mask
        planes, each unfolded into ``patch_size ** 2`` channels. An absent source's planes are all
        zero, so its weights add nothing: with three of seven sequences given, leaving them out
        saves 4/7 of the first conv, the widest one (~9 % of the generator's FLOPs)."""
        num_modalities, k = len(self.config.modalities), self.config.context_slices
        if len(present) == num_modalities:
            return None
        present = torch.as_tensor(present, device=device)
        planes = [present]
        if k:
            planes.append((num_modalities + present[:, None] * 2 * k + torch.arange(2 * k, device=device)).flatten())
        planes.append(num_modalities * (1 + 2 * k) + present)
        area = self.config.patch_size ** 2
        return (torch.cat(planes)[:, None] * area + torch.arange(area, device=device)).flatten()

    def _fuse(self, images, mask, common, embedding) -> list[torch.Tensor]:
        """PMM-Synth's fusion: per level, masked mean and max over the source streams, plus the common stream."""
        present = [i for i in range(images.shape[1]) if mask[:, i].any()]
        streams = [self.modality_encoders[i](self.unfold(images[:, i : i + 1]), embedding) for i in present]
        stream_mask = mask[:, present]  # [B, S]: which samples have each stream
        fused = []
        for level, fusion in enumerate(self.fusion):
            features = torch.stack([stream[level] for stream in streams], dim=1)  # [B, S, C, h, w]
            keep = stream_mask[:, :, None, None, None]
            mean = (features * keep).sum(1) / keep.sum(1)
            maximum = features.masked_fill(~keep, torch.finfo(features.dtype).min).amax(1)
            fused.append(fusion(torch.cat([mean, maximum, common[level]], dim=1)))
        return fused


class ModalityDiscriminators(ModelMixin, ConfigMixin):
    """One conditional (pix2pix-style) MONAI ``PatchDiscriminator`` per modality.

    The discriminator of modality ``j`` sees the masked sources ``[B, M, H, W]`` and a real or
    synthetic image of modality ``j`` ``[B, 1, H, W]``, and returns patch logits ``[B, 1, h, w]``.

    Args:
        modalities: the modality list, in order.
        channels: filters of the first conv (doubled per layer).
        num_layers_d: conv layers after the first.
        norm: MONAI norm name for the inner layers.
    """

    @register_to_config
    def __init__(
        self,
        modalities: Sequence[str] = MODALITIES,
        channels: int = 32,
        num_layers_d: int = 3,
        norm: str = "INSTANCE",
    ):
        super().__init__()
        # imported here: MONAI takes ~1.5 s to import, and synthesis (the generator) never needs it
        from monai.networks.nets import PatchDiscriminator

        self.discriminators = nn.ModuleList(
            PatchDiscriminator(
                spatial_dims=2, channels=channels, in_channels=len(modalities) + 1, out_channels=1,
                num_layers_d=num_layers_d, norm=norm,
            )
            for _ in modalities
        )

    def forward(
        self, sources: torch.Tensor, images: torch.Tensor, modality_indices: int | Sequence[int]
    ) -> torch.Tensor | dict[int, torch.Tensor]:
        """Patch logits of modality ``j``'s discriminator for ``images [B, 1, H, W]`` (``modality_indices=j``),
        or a dict ``{j: logits}`` for ``images [B, K, H, W]`` and K indices.

        The dict form judges several modalities in one call, which DDP needs: a wrapped module may
        run forward only once per backward pass.
        """
        if isinstance(modality_indices, int):
            return self.discriminators[modality_indices](torch.cat([sources, images], dim=1))[-1]
        if images.shape[1] != len(modality_indices):
            raise ValueError(f"{images.shape[1]} images for {len(modality_indices)} modality indices")
        return {j: self.discriminators[j](torch.cat([sources, images[:, k:k + 1]], dim=1))[-1]
                for k, j in enumerate(modality_indices)}
