"""Checkpoint files: reading any supported format into ours, checking weights against a model, saving.

The formats themselves (official DETA, detrex, HF, and how their keys map to ours) live in
deta.formats. Our state-dict keys are the official ones, minus the copies of the heads that the
official decoder re-registers, and with timm's numbering of the Swin patch-merging layers.
"""
import argparse
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from .errors import InputError, NoSpaceError
from .formats import SOURCE_FORMATS, TARGET_FORMATS, detect_format, from_ours, to_ours
from .formats.hf import category_names as hf_category_names
from .formats.hf import model_args as hf_model_args
from .formats.official import from_official, to_official
from .hub import checkpoint_file
from .zoo import ZOO

__all__ = ["HF_FOLDER_FILES", "SOURCE_FORMATS", "TARGET_FORMATS", "class_head_size", "convert_state_dict", "describe",
           "detect_format", "from_official", "from_ours", "input_file_at", "load_checkpoint", "load_model_weights",
           "save_atomically", "save_hf_folder", "save_text_atomically", "state_dict_problems", "to_official"]

StateDict = dict[str, Tensor]
# Files of a HuggingFace model folder, in order of preference.
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HF_CONFIG = "config.json"
HF_FOLDER_FILES = (_HF_WEIGHTS[0], _HF_CONFIG)  # what save_hf_folder writes
# Training state that only means something to the code base that wrote it (its parameter order).
_PORTABLE_FORMATS = ("deta", "official")


def convert_state_dict(state_dict: Mapping[str, Tensor], source_format: str = "auto") -> StateDict:
    """A state dict of any supported format (or `auto`-detected) in ours."""
    return to_ours(state_dict, detect_format(state_dict) if source_format == "auto" else source_format)


def load_checkpoint(path: str | os.PathLike, source_format: str = "auto") -> dict:
    """Load a checkpoint of any supported format; its 'model' entry is converted to ours.

    `path` is a file (ours, official, detrex: a dict with a 'model' entry or a bare state dict;
    HF: pytorch_model.bin or model.safetensors) or an HF model folder, or an http(s) URL or model-zoo
    name of either (deta.hub downloads it once). For HF, the config.json beside the weights supplies
    'args' (our main.py arguments for that model); a zoo name supplies those its file does not save.
    Training state written by another code base (detrex, HF) is dropped: it fits only that code's parameters.
    """
    source = str(path)
    path = checkpoint_file(source)
    weights = _hf_weights(path) if path.is_dir() else path
    if not weights.is_file():
        raise InputError(f"checkpoint {path}: no such file")
    checkpoint = _read(weights)
    state_dict = checkpoint.get("model", checkpoint)
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise InputError(f"checkpoint {path}: its 'model' entry is not a state dict of tensors")
    try:
        source_format = detect_format(state_dict) if source_format == "auto" else source_format
        converted = {"model": to_ours(state_dict, source_format)}
    except InputError as error:
        raise InputError(f"checkpoint {path}: {error}") from error
    if source_format in _PORTABLE_FORMATS and state_dict is not checkpoint:
        converted = {**checkpoint, **converted}
    config = weights.with_name(_HF_CONFIG)
    if source_format == "hf" and config.is_file():
        hf_config = json.loads(config.read_text())
        converted["args"] = hf_model_args(hf_config, str(config))
        converted["category_names"] = hf_category_names(hf_config)
    if converted.get("args") is None and source in ZOO and ZOO[source].args:
        converted["args"] = dict(ZOO[source].args)
    return converted


def input_file_at(output: str | os.PathLike, source: str | os.PathLike) -> Path | None:
    """The file of checkpoint `source` (the file, or any file of an HF folder) that writing `output` would replace,
    also through a symbolic or hard link; None when there is none."""
    output, source = Path(output), Path(source)
    read = [source, *source.iterdir()] if source.is_dir() else [source]
    return next((path for path in read if output.exists() and path.exists() and os.path.samefile(output, path)),
                None)


def class_head_size(state_dict: Mapping[str, Tensor], source: str, flag: str) -> int:
    """Number of classes of a checkpoint's class head (ours and the official ones are all `class_embed.N`);
    without one, an InputError naming `source` and the `flag` that gives the number."""
    head = state_dict.get("class_embed.0.bias")
    if head is None:
        raise InputError(f"{source}: the checkpoint has no class_embed.0.bias to size the class head; pass {flag}")
    return head.shape[0]


def _hf_weights(folder: Path) -> Path:
    found = [folder / name for name in _HF_WEIGHTS if (folder / name).is_file()]
    if not found:
        raise InputError(f"checkpoint {folder}: a folder, but without {' or '.join(_HF_WEIGHTS)}; pass a file")
    return found[0]


def _read(path: Path) -> dict[str, Any]:
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(path)
        except (SafetensorError, OSError) as error:
            raise InputError(f"checkpoint {path}: not a readable safetensors file ({error})") from error
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
    return checkpoint


def state_dict_problems(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Missing, unexpected and wrongly shaped keys, one description each (empty when it fits)."""
    expected = model.state_dict()
    problems = [f"missing {key}" for key in expected if key not in state_dict]
    problems += [f"unexpected {key}" for key in state_dict if key not in expected]
    problems += [f"shape of {key}: checkpoint {tuple(value.shape)}, model {tuple(expected[key].shape)}"
                 for key, value in state_dict.items() if key in expected and value.shape != expected[key].shape]
    return problems


def describe(problems: list[str], shown: int = 8) -> str:
    """'N problems: first; second; ...; and M more' on one line."""
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return f"{len(problems)} problem{'s' * (len(problems) != 1)}: " + "; ".join(problems[:shown]) + more


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
        raise InputError(f"checkpoint does not fit the model built from these flags ({describe(problems)}); "
                         "check --backbone, --hidden_dim, --nheads, --num_feature_levels, --num_queries, "
                         "--num_classes, --dim_feedforward and the layer counts")
    model.load_state_dict(state_dict)
    return skipped


def save_atomically(obj: object, path: str | os.PathLike,
                    write: Callable[[object, BinaryIO], object] = torch.save) -> None:
    """write(obj, file) (torch.save by default) through a temporary file in the same folder, so `path` is
    never half-written. A write that fails for lack of space raises NoSpaceError (the file as it was, no
    temporary left)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(obj, file)
            file.flush()
            os.fsync(file.fileno())
        # mkstemp creates the file private to its owner; give it the permissions of a plain open().
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if NoSpaceError.caused(error):
            raise NoSpaceError(path) from error
        raise


def save_text_atomically(text: str, path: str | os.PathLike) -> None:
    """`text` (UTF-8) to `path` through a temporary file, like `save_atomically`."""
    save_atomically(text, path, lambda obj, file: file.write(obj.encode()))


def save_hf_folder(state_dict: Mapping[str, Tensor], config: Mapping[str, Any], folder: str | os.PathLike) -> None:
    """An HF model folder: model.safetensors and config.json, each written atomically (weights first)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: an HF model is a folder, and this is a file; choose another output")
    # safetensors stores no shared memory: the head copies and the split projections get their own.
    tensors = {key: value.detach().contiguous().clone() for key, value in state_dict.items()}
    save_atomically(tensors, folder / _HF_WEIGHTS[0],
                    lambda obj, file: file.write(safetensors_bytes(obj, metadata={"format": "pt"})))
    save_text_atomically(json.dumps(config, indent=2) + "\n", folder / _HF_CONFIG)
