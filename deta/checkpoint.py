"""Checkpoint formats: reading ours and official DETA's, checking them, writing them back.

Our state-dict keys are the official ones, minus the official copies of the heads that its
decoder re-registers (`transformer.decoder.class_embed.*` / `bbox_embed.*`, always equal to
the top-level `class_embed.*` / `bbox_embed.*`) and minus profiling leftovers (`*total_ops`,
`*total_params`) found in some released files.
"""
import argparse
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .errors import InputError

FORMATS = ("deta", "official")
_DECODER_HEAD_PREFIXES = ("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")
_PROFILING_SUFFIXES = ("total_ops", "total_params")

StateDict = dict[str, Tensor]


def detect_format(state_dict: Mapping[str, Tensor]) -> str:
    if any(key.startswith(_DECODER_HEAD_PREFIXES) or key.endswith(_PROFILING_SUFFIXES) for key in state_dict):
        return "official"
    if any(key.startswith(("backbone.0.", "transformer.", "class_embed.")) for key in state_dict):
        return "deta"
    raise InputError(f"not a DETA state dict: unrecognised keys such as {sorted(state_dict)[:3]}")


def from_official(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Official DETA state dict → ours; the decoder's head copies must equal the top-level heads."""
    converted = {}
    for key, value in state_dict.items():
        if key.endswith(_PROFILING_SUFFIXES):
            continue
        if key.startswith(_DECODER_HEAD_PREFIXES):
            primary = key.removeprefix("transformer.decoder.")
            if primary not in state_dict or not torch.equal(state_dict[primary], value):
                raise InputError(f"official checkpoint: {key} differs from {primary}; the file is inconsistent")
            continue
        converted[key] = value
    return converted


def to_official(state_dict: Mapping[str, Tensor], two_stage: bool, with_box_refine: bool) -> StateDict:
    """Ours → official: add the decoder's head copies that the official model registers."""
    converted = dict(state_dict)
    copied = ([("class_embed.", "transformer.decoder.class_embed.")] if two_stage else []) + \
             ([("bbox_embed.", "transformer.decoder.bbox_embed.")] if with_box_refine else [])
    for source, target in copied:
        converted.update({target + key.removeprefix(source): value
                          for key, value in state_dict.items() if key.startswith(source)})
    return converted


def convert_state_dict(state_dict: Mapping[str, Tensor], source_format: str = "auto") -> StateDict:
    source_format = detect_format(state_dict) if source_format == "auto" else source_format
    if source_format == "official":
        return from_official(state_dict)
    if source_format == "deta":
        return dict(state_dict)
    raise InputError(f"unknown checkpoint format {source_format!r}; expected one of {', '.join(FORMATS)} or auto")


def load_checkpoint(path: str | os.PathLike, source_format: str = "auto") -> dict:
    """Load a checkpoint file of any supported format; its 'model' entry is converted to ours."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path}: no such file")
    # Official checkpoints pickle their argparse.Namespace; allow that one class and nothing else.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
            reason = (f"it pickles {unsupported.group(1)}, which is not loaded for safety; re-save its tensors"
                      if unsupported else "corrupt, truncated, or not written by torch.save")
            raise InputError(f"checkpoint {path}: cannot be read as a PyTorch checkpoint ({reason})") from error
    if not isinstance(checkpoint, dict):
        raise InputError(f"checkpoint {path}: expected a dict with a 'model' entry, got {type(checkpoint).__name__}")
    state_dict = checkpoint.get("model", checkpoint)
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise InputError(f"checkpoint {path}: its 'model' entry is not a state dict of tensors")
    try:
        checkpoint = dict(checkpoint, model=convert_state_dict(state_dict, source_format))
    except InputError as error:
        raise InputError(f"checkpoint {path}: {error}") from error
    return checkpoint


def state_dict_problems(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Missing, unexpected and wrongly shaped keys, one description each (empty when it fits)."""
    expected = model.state_dict()
    problems = [f"missing {key}" for key in expected if key not in state_dict]
    problems += [f"unexpected {key}" for key in state_dict if key not in expected]
    problems += [f"shape of {key}: checkpoint {tuple(value.shape)}, model {tuple(expected[key].shape)}"
                 for key, value in state_dict.items() if key in expected and value.shape != expected[key].shape]
    return problems


def load_model_weights(model: nn.Module, state_dict: Mapping[str, Tensor], finetune: bool = False) -> list[str]:
    """Load weights strictly; with `finetune`, class-head tensors of another size are skipped.

    Returns the keys skipped. Raises InputError listing every mismatch otherwise.
    """
    expected = model.state_dict()
    skipped = []
    if finetune:
        skipped = [key for key, value in state_dict.items()
                   if "class_embed" in key and key in expected and value.shape != expected[key].shape]
        # The model keeps its freshly initialised heads where the checkpoint's do not fit.
        state_dict = {**state_dict, **{key: expected[key] for key in skipped}}
    problems = state_dict_problems(model, state_dict)
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise InputError(f"checkpoint does not fit the model built from these flags ({len(problems)} problems: "
                         f"{shown}); check --backbone, --num_feature_levels, --num_classes and the layer counts")
    model.load_state_dict(state_dict)
    return skipped


def save_atomically(obj: object, path: str | os.PathLike) -> None:
    """torch.save through a temporary file in the same folder, so `path` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        # mkstemp creates the file private to its owner; give it the permissions of a plain open().
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
