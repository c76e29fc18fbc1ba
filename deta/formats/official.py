"""Official DETA (jozhang97/DETA) checkpoints: our keys plus the decoder's head copies, with the
original Swin code's numbering of the patch-merging layers, and sometimes profiling leftovers."""
from collections.abc import Mapping

from torch import Tensor

from .head_copies import add_head_copies, drop_head_copies
from .rules import RuleTable, StateDict

COPY_PREFIX = "transformer.decoder."
_PROFILING_SUFFIXES = ("total_ops", "total_params")

RULES = RuleTable([
    # timm opens each Swin stage with its patch merging; the original code closes the previous one with it.
    ("backbone.0.body.layers.{i}.downsample.*", "backbone.0.body.layers.{i-1}.downsample.*"),
    ("*", "*"),
])


def is_official(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether keys that only official files have are present (their absence proves nothing)."""
    only_official = (COPY_PREFIX + "class_embed.", COPY_PREFIX + "bbox_embed.", "backbone.0.body.layers.0.downsample.")
    return any(key.startswith(only_official) or key.endswith(_PROFILING_SUFFIXES) for key in state_dict)


def from_official(state_dict: Mapping[str, Tensor], source: str = "official checkpoint") -> StateDict:
    """Official state dict → ours; the decoder's head copies must equal the detector's heads."""
    state_dict = {key: value for key, value in state_dict.items() if not key.endswith(_PROFILING_SUFFIXES)}
    return RULES.rename(drop_head_copies(state_dict, COPY_PREFIX, source), to_ours=True, source=source)


def to_official(state_dict: Mapping[str, Tensor], two_stage: bool, with_box_refine: bool) -> StateDict:
    """Ours → official: original Swin numbering and the head copies that the official model registers."""
    renamed = RULES.rename(state_dict, to_ours=False, source="our checkpoint")
    return add_head_copies(renamed, COPY_PREFIX, two_stage, with_box_refine)
