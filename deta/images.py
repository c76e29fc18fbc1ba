"""Image files as the model reads them: 8-bit RGB, in the orientation their pixels were annotated in.

PIL's `convert("RGB")` is right for most modes but not all: it clips 16-bit samples at 255 (a 16-bit
PNG turns white) and cannot convert premultiplied alpha. EXIF orientation is a separate question:
photos from phones store their pixels sideways with a tag saying how to turn them; whether the
annotations follow the stored or the displayed frame is decided by the caller (`upright`, `orientation`).
"""
import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import InputError

FIX = "replace the file or drop it from the annotations"  # what to do about an unreadable image
EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientations 5-8 turn the image by 90 degrees: displayed width and height are the stored ones swapped.
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# Integer modes whose samples are 16-bit: I;16* from 16-bit PNG and TIFF, I from older Pillow's 16-bit PNGs.
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
_UINT16_TO_UINT8 = 255 / 65535


@contextlib.contextmanager
def _opened(path: str | Path, fix: str) -> Iterator[Image.Image]:
    """The image file at `path`, open; an unreadable file raises InputError naming it and suggesting `fix`."""
    try:
        with Image.open(path) as image:
            yield image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL's "unreadable"
        raise InputError(f"{path}: cannot read image ({err}); {fix}") from err


def open_image(path: str | Path, fix: str = FIX) -> Image.Image:
    """The image file at `path`, decoded (first frame); an unreadable file raises InputError naming it and
    suggesting `fix`."""
    with _opened(path, fix) as image:
        image.load()
        return image


def header(path: str | Path, fix: str = FIX) -> tuple[tuple[int, int], int]:
    """((width, height) as stored, EXIF orientation) of an image file, without decoding its pixels."""
    with _opened(path, fix) as image:
        return image.size, orientation(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16-bit samples scaled (65535 -> 255), float samples read as [0, 1] when
    they fit there and as [0, 255] otherwise, alpha dropped, palette, CMYK, YCbCr, LAB and HSV converted."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        samples = np.asarray(image, dtype=np.float64) * _UINT16_TO_UINT8
        return Image.fromarray(samples.round().clip(0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        samples = np.asarray(image, dtype=np.float64)
        if np.nanmax(samples, initial=0.0) <= 1.0:
            samples = samples * 255
        return Image.fromarray(np.nan_to_num(samples).round().clip(0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "La":  # premultiplied alpha has no direct conversion to RGB
        image = image.convert("LA")
    return image.convert("RGB")


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1 = as stored, 2-8 = flipped and/or turned), 1 without a tag."""
    value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def displayed_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the image as EXIF-aware viewers show it."""
    return turned_size(image.size, orientation(image))


def turned_size(size: tuple[int, int], orientation_value: int) -> tuple[int, int]:
    """(width, height) of an image stored at `size` once turned by this EXIF orientation."""
    width, height = size
    return (height, width) if orientation_value in TRANSPOSING_ORIENTATIONS else (width, height)


def follows_exif(size: tuple[int, int], orientation_value: int, annotated: tuple[int, int] | None) -> bool | None:
    """Whether the annotations of an image stored at `size` (width, height) with this EXIF orientation are in
    its displayed frame (True: turn it) or its stored one (False), judged by the size they were made for,
    `annotated`; None when neither frame has that size.

    The stored frame wins where the size cannot tell (both frames fit: square images, flips, half turns; or
    no size given): it is how the official code reads every image, so that COCO trains as in the paper.
    """
    if annotated is None or size == annotated:
        return False
    return True if turned_size(size, orientation_value) == annotated else None


def upright(image: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says (as viewers and annotation tools show it)."""
    return ImageOps.exif_transpose(image) if orientation(image) != 1 else image


def read_rgb(path: str | Path, fix: str = FIX) -> Image.Image:
    """A photo as viewers show it: EXIF orientation applied, 8-bit RGB (for prediction, where no annotation
    says otherwise)."""
    return to_rgb(upright(open_image(path, fix)))
