"""Choosing the sparse support (the mask) of a RoSA model.

- :mod:`~rosa.mask.layers`: the layers a mask covers, their names, setting a mask on them.
- :mod:`~rosa.mask.statistics`: gradient statistics from hooks (all-reduced under data parallelism).
- :mod:`~rosa.mask.selection`: scores (fisher, grad, magnitude, random, a callable) and top-k / global selection.
- :mod:`~rosa.mask.builder`: layer groups within a memory budget, from statistics to supports.
- :mod:`~rosa.mask.collect`: ``collect_mask``, the whole thing over a list of batches.
- :mod:`~rosa.mask.files`: mask files.

When the mask is chosen during training (warm-up, collection, restart) is :mod:`rosa.schedule`'s business.

The layers, model and file format know nothing of how a mask is chosen: a mask is a support per layer, set with
``RosaLayer.set_support``.
"""

from .builder import MaskBuilder, accumulator_bytes, plan_layer_groups
from .collect import collect_mask
from .files import MASK_FORMAT, MASK_FORMAT_VERSION, MaskFileError, load_mask, read_mask_file, save_mask
from .layers import (
    MaskError,
    apply_mask,
    canonical_layer_name,
    has_mask,
    layer_budget,
    mask_layers,
    mask_summary,
    resolve_adapter,
)
from .selection import (
    METHODS,
    default_stats,
    layer_scores,
    method_name,
    name_seed,
    select_global,
    topk_flat_index,
)
from .statistics import STATS, StatCollector

__all__ = [
    "MASK_FORMAT",
    "MASK_FORMAT_VERSION",
    "METHODS",
    "STATS",
    "MaskBuilder",
    "MaskError",
    "MaskFileError",
    "StatCollector",
    "accumulator_bytes",
    "apply_mask",
    "canonical_layer_name",
    "collect_mask",
    "default_stats",
    "has_mask",
    "layer_budget",
    "layer_scores",
    "load_mask",
    "mask_layers",
    "mask_summary",
    "method_name",
    "name_seed",
    "plan_layer_groups",
    "read_mask_file",
    "resolve_adapter",
    "save_mask",
    "select_global",
    "topk_flat_index",
]
