"""The class and box heads that other code bases register a second time, under their decoder.

Official DETA, detrex and HF all hand the detector's head lists to the decoder as well, so their
state dicts hold every head twice; ours holds each once.
"""
from collections.abc import Mapping

import torch
from torch import Tensor

from ..errors import InputError
from .rules import StateDict

_HEADS = ("class_embed.", "bbox_embed.")


def drop_head_copies(state_dict: Mapping[str, Tensor], copy_prefix: str, source: str) -> StateDict:
    """Keep one key per head tensor: the copy under `copy_prefix` must equal the detector's.

    A copy whose original is absent becomes the original: formats that store shared tensors
    once (HF safetensors) may keep either name.
    """
    kept = {}
    for key, value in state_dict.items():
        original = key.removeprefix(copy_prefix)
        if key.startswith(copy_prefix) and original.startswith(_HEADS):
            if original in state_dict:
                if not torch.equal(state_dict[original], value):
                    raise InputError(f"{source}: {key} differs from {original}; the file is inconsistent")
                continue
            key = original
        kept[key] = value
    return kept


def add_head_copies(state_dict: Mapping[str, Tensor], copy_prefix: str, two_stage: bool,
                    with_box_refine: bool) -> StateDict:
    """Add the decoder's copies: of the class heads in two-stage mode, of the box heads with refinement."""
    with_copies = dict(state_dict)
    copied = [head for head, registered in zip(_HEADS, (two_stage, with_box_refine), strict=True) if registered]
    with_copies.update({copy_prefix + key: value for key, value in state_dict.items() if key.startswith(tuple(copied))})
    return with_copies
