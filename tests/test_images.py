"""Image decoding: every PIL mode to the right 8-bit RGB, EXIF orientation, unreadable files."""
import numpy as np
import pytest
from PIL import Image

from deta.errors import InputError
from deta.images import (
    EXIF_ORIENTATION_TAG,
    displayed_size,
    follows_exif,
    header,
    open_image,
    orientation,
    read_rgb,
    to_rgb,
    upright,
)


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int64)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5957)  # 0 .. 65527
    Image.fromarray(ramp).save(tmp_path / "depth.png")
    loaded = open_image(tmp_path / "depth.png")
    assert loaded.mode.startswith("I")
    rgb = _pixels(to_rgb(loaded))
    expected = np.round(ramp / 257).astype(np.int64)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 1], expected)
    assert len(np.unique(rgb)) == 12  # PIL's convert clips all but the first sample to 255


def test_float_images_in_unit_range_are_scaled():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert _pixels(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]
    byte_range = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32))
    assert _pixels(to_rgb(byte_range))[0, :, 0].tolist() == [0, 100, 255]


@pytest.mark.parametrize(("mode", "value", "expected"), [
    ("L", 90, (90, 90, 90)),
    ("LA", (90, 10), (90, 90, 90)),
    ("La", (90, 255), (90, 90, 90)),
    ("RGBA", (10, 20, 30, 0), (10, 20, 30)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("HSV", (0, 255, 255), (255, 0, 0)),
    ("1", 1, (255, 255, 255)),
])
def test_other_modes_convert_to_their_colour(mode, value, expected):
    image = Image.new(mode, (2, 2), value)
    assert tuple(_pixels(to_rgb(image))[0, 0]) == expected


def test_palette_image_gives_its_palette_colours(tmp_path):
    rgb = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8))
    rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=2).save(tmp_path / "palette.png")
    loaded = open_image(tmp_path / "palette.png")
    assert loaded.mode == "P"
    assert _pixels(to_rgb(loaded)).tolist() == [[[255, 0, 0], [0, 0, 255]]]


def _photo(path, orientation_value: int) -> np.ndarray:
    """A 32x16 (w x h) JPEG, red in its left quarter, with the given EXIF orientation; returns its stored pixels."""
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, :8] = (255, 0, 0)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation_value
    Image.fromarray(pixels).save(path, exif=exif, quality=100)
    return np.asarray(Image.open(path).convert("RGB"))


def test_exif_orientation_six_is_turned_upright(tmp_path):
    stored = _photo(tmp_path / "phone.jpg", 6)
    image = open_image(tmp_path / "phone.jpg")
    assert image.size == (32, 16) and orientation(image) == 6 and displayed_size(image) == (16, 32)
    turned = read_rgb(tmp_path / "phone.jpg")
    assert turned.size == (16, 32)
    # Orientation 6: the stored image is shown turned 90 degrees clockwise, its left side on top.
    assert np.array_equal(np.asarray(turned), np.rot90(stored, k=-1))
    assert np.asarray(turned)[:6, :, 0].min() > 200 and np.asarray(turned)[10:, :, 0].max() < 50


def test_images_without_orientation_are_left_alone(tmp_path):
    stored = _photo(tmp_path / "plain.jpg", 1)
    image = open_image(tmp_path / "plain.jpg")
    assert orientation(image) == 1 and displayed_size(image) == (32, 16)
    assert upright(image) is image
    assert np.array_equal(np.asarray(read_rgb(tmp_path / "plain.jpg")), stored)


def test_unreadable_file_names_itself_and_the_fix(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"broken.jpg: cannot read image .*; skipped$"):
        open_image(tmp_path / "broken.jpg", fix="skipped")


@pytest.mark.parametrize(("size", "orientation_value", "annotated", "expected"), [
    ((32, 16), 6, (16, 32), True),  # annotated as displayed
    ((32, 16), 6, (32, 16), False),  # annotated as stored
    ((32, 16), 6, (40, 30), None),  # neither
    ((32, 16), 6, None, False),  # no size to compare: as stored, as the official code reads it
    ((32, 32), 8, (32, 32), False),  # both fit: as stored
    ((32, 16), 3, (32, 16), False),  # a half turn keeps the size: as stored
    ((32, 16), 1, (16, 32), None),
])
def test_annotations_follow_the_frame_of_their_size(size, orientation_value, annotated, expected):
    assert follows_exif(size, orientation_value, annotated) is expected


def test_header_reads_size_and_orientation_without_decoding(tmp_path):
    _photo(tmp_path / "phone.jpg", 6)
    assert header(tmp_path / "phone.jpg") == ((32, 16), 6)
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(InputError, match=r"broken.jpg: cannot read image"):
        header(tmp_path / "broken.jpg")
