"""Data: real-layout adapters, phantom cohorts, preparation, the slice cache, batch scheduling."""

from .conditions import MODES, SynthesisConditionSampler, loss_weights
from .cache import CacheError
from .dataset import SliceDataset
from .layouts import LayoutError, detect_layout, scan
from .manifest import Case, ManifestError, read_manifest, write_manifest
from .prepare import PrepareConfig, prepare
from .sampler import ModalityConsistentBatchSampler, group_keys

__all__ = [
    "MODES", "SynthesisConditionSampler", "loss_weights",
    "CacheError", "SliceDataset",
    "LayoutError", "detect_layout", "scan",
    "Case", "ManifestError", "read_manifest", "write_manifest",
    "PrepareConfig", "prepare",
    "ModalityConsistentBatchSampler", "group_keys",
]
