"""The precision the pipelines' networks run in: bfloat16 autocast where the hardware does bf16 natively.

Rule: ``precision="auto"`` (the pipelines' default) runs the networks' convolutions and matrix
products under ``torch.autocast(dtype=torch.bfloat16)`` on a CPU whose oneDNN has native bf16
(AVX512-BF16 or AMX), and in float32 anywhere else (a CPU without it would emulate bf16 and be
slower; on CUDA, float32 has not been measured against bf16 here). ``"float32"`` and ``"bfloat16"``
force one.

Why: on two AVX512-BF16 cores (BENCHMARKS.md, session 11) bf16 autocast takes the GAN pipeline's call
on a 155-slice BraTS volume (3 targets) from 4.8 s to 3.5 s; the synthetic images change by 1e-4 on
average on the [0, 1] scale (0.06 at the worst voxel), far below the synthesis error (~0.05), and the
held-out scores move by at most 0.05 dB per cohort (22.55 against 22.56 dB over all 38 case-tasks).

Only the networks run under autocast (the predictor, the UNet, the generator): the wavelet latent
and the scheduler stay in float32 (the Haar transform must stay lossless), and each network's output
is cast back to the caller's dtype. Weights stay float32.
"""

from __future__ import annotations

import contextlib

import torch

#: the values of the pipelines' ``precision`` argument
PRECISIONS = ("auto", "float32", "bfloat16")


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 convolutions natively (a CPU with AVX512-BF16 or AMX)."""
    if torch.device(device).type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"bfloat16"`` or ``"float32"`` for ``device`` (see the module's rule); others as given."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    return precision


def network_autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context a network call runs in for a resolved ``precision``: bf16 autocast, or nothing."""
    if precision == "bfloat16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
