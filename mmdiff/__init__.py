"""mmdiff: fill in missing MRI sequences across heterogeneous datasets."""

__version__ = "0.1.0"

from .modalities import MODALITIES  # noqa: E402

__all__ = ["MODALITIES", "__version__"]
