"""Decoding image files to 8-bit RGB pixels, without PyTorch.

Verification, training, evaluation and plots all see an image through `load_rgb`, so the
pixels that are checked, hashed and learned from are the same everywhere. This module is
imported when the workflow is parsed, so it uses PIL and numpy only, never torch.

How each mode becomes 8-bit RGB (the same value always gives the same pixel, whichever file
it comes from, so there is no per-image min/max stretching):

- EXIF orientation is applied first, so the image is upright.
- 16-bit integers (`I;16`, `I;16L`, `I;16B`, `I;16N`): 0..65535 becomes 0..255 as
  round(v / 257), so 65535 is 255 and 257 is 1.
- 32-bit signed integers (`I`): Pillow opens many 16-bit files (signed 16-bit TIFF, 16-bit
  PNG in older Pillow) as `I`, so an image whose values all lie in 0..65535 is scaled as
  16-bit. Otherwise negatives become 0 and 0..2**31-1, everything `I` can hold above zero,
  becomes 0..255.
- 32-bit floats (`F`): an image whose maximum is at most 1 is taken as 0..1 and multiplied
  by 255; otherwise it is taken as 0..255. Either way values are clipped to 0..255 and NaN
  is 0.
- `1` is black (0) or white (255); `P` and `PA` are looked up in their palette; `CMYK`,
  `YCbCr`, `LAB` and `HSV` go through Pillow's own conversion to RGB.
- Transparency, from an alpha band (`LA`, `La`, `PA`, `RGBA`, `RGBa`), a palette with alpha
  (`P` with `info['transparency']`) or a transparent colour key (`1`, `L`, `RGB`, `I;16`,
  `I` with `info['transparency']`), is composited over `BACKGROUND`, white. Colour already
  premultiplied by alpha (`La`, `RGBa`) is not multiplied again.

All results are rounded to the nearest integer.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

# Transparent pixels become white rather than whatever colour they happen to hide.
BACKGROUND = (255, 255, 255)

_ALPHA_MODES = ("LA", "La", "RGBA", "RGBa")
_PREMULTIPLIED = ("La", "RGBa")
_KEYED_MODES = ("1", "L", "RGB", "I", "I;16", "I;16L", "I;16B", "I;16N")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode any PIL-readable image upright (EXIF orientation) as 8-bit RGB."""
    # Opened from a file object, not a name: Pillow 13 memory-maps an uncompressed TIFF opened
    # by name using its upright size, so one rotated by its orientation tag (5 to 8) comes out
    # scrambled.
    with open(path, "rb") as file, Image.open(file) as image:
        return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """The 8-bit RGB pixels of an image of any mode, by the rules in the module docstring."""
    if image.mode in ("P", "PA"):
        # Only Pillow knows every place a palette image keeps its alpha: a tRNS chunk, an
        # RGBA palette, the A band.
        image = image.convert("RGBA")
    colour, alpha = _colour(image), _alpha(image)
    if alpha is None:
        return colour
    rgb = np.asarray(colour, dtype=np.float32)
    if image.mode not in _PREMULTIPLIED:
        rgb = rgb * alpha
    rgb = rgb + np.asarray(BACKGROUND, dtype=np.float32) * (1 - alpha)
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))


def _colour(image: Image.Image) -> Image.Image:
    if image.mode in _ALPHA_MODES:
        # Bands taken as they are keep La and RGBa premultiplied: Pillow cannot convert La to
        # RGB, and converting RGBa would divide by alpha only for `to_rgb` to multiply again.
        bands = image.split()[:-1]
        return Image.merge("RGB", bands * 3 if len(bands) == 1 else bands)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # Pillow's own conversion clips these to 255 instead of scaling them.
        grey = _scale_to_8_bits(image.mode, np.asarray(image))
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def _scale_to_8_bits(mode: str, values: np.ndarray) -> np.ndarray:
    if mode == "F":
        values = np.nan_to_num(values, nan=0.0)
        return values * 255 if values.max(initial=0) <= 1 else values
    if mode == "I" and (values.min(initial=0) < 0 or values.max(initial=0) > 65535):
        return np.maximum(values, 0) / ((2**31 - 1) / 255)
    return values / 257


def _alpha(image: Image.Image) -> np.ndarray | None:
    """Opacity, 0..1, shaped height x width x 1; None for an opaque image."""
    if image.mode in _ALPHA_MODES:
        return np.asarray(image.split()[-1], dtype=np.float32)[..., None] / 255
    key = image.info.get("transparency")
    if image.mode not in _KEYED_MODES or not isinstance(key, int | tuple):
        return None
    # Pillow gives a "1" image's key as 0 or 255, the values its pixels have in mode L.
    pixels = np.asarray(image.convert("L") if image.mode == "1" else image)
    keyed = pixels == key if pixels.ndim == 2 else np.all(pixels == np.asarray(key), axis=-1)
    return (~keyed)[..., None].astype(np.float32)
