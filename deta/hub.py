"""Checkpoints by path, URL or model-zoo name: `checkpoint_file` gives a local file or HF model folder.

URLs and zoo files are downloaded once into torch's hub cache (`$TORCH_HOME/hub/checkpoints`, as
`torch.hub.load_state_dict_from_url` keeps them) with torch.hub's downloader: a progress bar, a SHA-256
check where the zoo gives a published hash or the URL ends in `#sha256=<hex>` (pip's convention). A download is
checked to be a checkpoint (a complete zip or legacy torch file, a safetensors file, or JSON) before it
enters the cache: a refused, failed or cut-short download leaves nothing there.
"""
import json
import os
import re
import shutil
import uuid
import zipfile
from http.client import HTTPException
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch.hub
from safetensors import safe_open

from .errors import InputError
from .zoo import ZOO, ZooEntry

_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a"  # pickle protocol 2, then torch's 10-byte magic number


def is_remote(source: str | os.PathLike) -> bool:
    """Whether `source` names a download (a URL or a zoo name) rather than a local path."""
    text = str(source)
    return text.startswith(("https://", "http://")) or (text in ZOO and not Path(text).exists())


def checkpoint_file(source: str | os.PathLike, progress: bool = True) -> Path:
    """The local file or folder of checkpoint `source`: an existing path as is; an http(s) URL or a name of
    deta.zoo.ZOO downloaded into the hub cache unless already there. InputError names what failed."""
    text = str(source)
    if not is_remote(text):
        if not Path(text).exists():
            raise InputError(f"checkpoint {text}: no such file, nor an http(s) URL or a model-zoo name (known "
                             f"names: {', '.join(ZOO)})")
        return Path(text)
    if text in ZOO:
        return _fetch_entry(text, ZOO[text], progress)
    url = urlparse(text)
    name = Path(url.path).name
    if not name:
        raise InputError(f"checkpoint {text}: the URL names no file; pass the URL of a checkpoint file")
    sha256 = re.fullmatch(r"sha256=([0-9a-fA-F]+)", url.fragment)
    if url.fragment and not sha256:
        raise InputError(f"checkpoint {text}: the only URL fragment understood is #sha256=<hex digest or prefix>")
    target = cache_dir() / name
    if not target.is_file():
        _download(url._replace(fragment="").geturl(), target, sha256.group(1).lower() if sha256 else None, progress)
    return target


def cache_dir() -> Path:
    """Where downloads are kept: torch.hub's checkpoint cache under $TORCH_HOME."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _fetch_entry(name: str, entry: ZooEntry, progress: bool) -> Path:
    """A zoo file, or the files of an HF model folder, downloaded together: the folder appears whole or not."""
    if len(entry.files) == 1:
        ((file, url),) = entry.files.items()
        target = cache_dir() / file
        if not target.is_file():
            _download(url, target, entry.sha256.get(file), progress)
        return target
    folder = cache_dir() / name.replace("/", "--")
    if folder.is_dir():
        return folder
    staging = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}.download")
    try:
        for file, url in entry.files.items():
            _download(url, staging / file, entry.sha256.get(file), progress)
        try:
            os.replace(staging, folder)
        except OSError:  # another process put it there first
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _download(url: str, target: Path, sha256: str | None, progress: bool) -> None:
    """`url` to `target` through a temporary name beside it, kept only when complete and a checkpoint."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.download")
    try:
        try:
            torch.hub.download_url_to_file(url, str(temporary), hash_prefix=sha256, progress=progress)
        except (URLError, OSError, HTTPException) as err:
            reason = err.reason if type(err) is URLError else err  # HTTPError says its status itself
            raise InputError(f"download of {url} failed ({reason}); check the URL and the connection") from err
        except RuntimeError as err:  # torch.hub's hash check
            raise InputError(f"download of {url}: {err}; the file is not the published one") from err
        if not _is_checkpoint(temporary, target.suffix):
            raise InputError(f"download of {url}: not a checkpoint (a complete PyTorch or safetensors file), or cut "
                             "short; nothing was kept, check the URL and try again")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _is_checkpoint(path: Path, suffix: str) -> bool:
    """A complete file of a format that load_checkpoint reads (torch zip or legacy, safetensors), or JSON (an HF
    config.json). A zip file ends in its directory, so a cut one is refused."""
    if suffix == ".json":
        try:
            json.loads(path.read_text())
            return True
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False
    if zipfile.is_zipfile(path):
        return True
    with path.open("rb") as file:
        if file.read(len(_LEGACY_TORCH_MAGIC)) == _LEGACY_TORCH_MAGIC:
            return True
    try:
        with safe_open(str(path), "pt"):
            return True
    except Exception:  # safetensors raises its own error types for any malformed header
        return False
