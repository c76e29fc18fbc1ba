"""State-dict formats of the other DETA code bases (official, detrex, HF) and conversion to and from ours."""
from collections.abc import Mapping

from torch import Tensor

from ..errors import InputError
from .detrex import from_detrex, is_detrex, to_detrex
from .hf import from_hf, is_hf, to_hf
from .official import from_official, is_official, to_official
from .rules import StateDict

_READERS = {"deta": dict, "official": from_official, "detrex": from_detrex, "hf": from_hf}
_WRITERS = {"official": to_official, "detrex": to_detrex, "hf": to_hf}
SOURCE_FORMATS = tuple(_READERS)
TARGET_FORMATS = ("deta", *_WRITERS)


def detect_format(state_dict: Mapping[str, Tensor]) -> str:
    """The format of a state dict, from keys only that format has; "deta" is ours."""
    for name, is_format in (("hf", is_hf), ("detrex", is_detrex), ("official", is_official)):
        if is_format(state_dict):
            return name
    if any(key.startswith(("backbone.0.", "transformer.", "class_embed.")) for key in state_dict):
        return "deta"
    raise InputError(f"not a DETA state dict: unrecognised keys such as {sorted(state_dict)[:3]}")


def to_ours(state_dict: Mapping[str, Tensor], source_format: str) -> StateDict:
    if source_format not in _READERS:
        raise InputError(f"unknown checkpoint format {source_format!r}; expected one of "
                         f"{', '.join(SOURCE_FORMATS)} or auto")
    return _READERS[source_format](state_dict)


def from_ours(state_dict: Mapping[str, Tensor], target_format: str, two_stage: bool,
              with_box_refine: bool) -> StateDict:
    """Ours → `target_format`; the decoder's head copies depend on the two flags."""
    if target_format == "deta":
        return dict(state_dict)
    if target_format not in _WRITERS:
        raise InputError(f"cannot write {target_format!r} checkpoints; expected one of {', '.join(TARGET_FORMATS)}")
    return _WRITERS[target_format](state_dict, two_stage, with_box_refine)
