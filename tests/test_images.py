"""transfer_learning.images.load_rgb: every image mode decodes to the right 8-bit RGB pixels.

Each test writes a horizontal gradient in one mode to a file format that stores that mode,
checks by reopening it that Pillow really wrote that mode, and compares what `load_rgb` gives
with 8-bit values worked out here from the stored values. No Pillow reader gives HSV, RGBa,
I;16L or I;16N (a little-endian 16-bit file opens as I;16, a premultiplied RGB TIFF as RGBA),
so those modes go through `to_rgb`, which is `load_rgb` after the file is read.
"""

from __future__ import annotations

import colorsys
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow_scripts"))

from transfer_learning.images import load_rgb, to_rgb  # noqa: E402

WIDTH = 256
X = np.arange(WIDTH)
DEEP = np.rint(np.linspace(0, 65535, WIDTH))  # a 16-bit ramp, 0 to 65535
GREY_PALETTE = np.stack([X, 255 - X, X // 2], axis=1)  # entry i is (i, 255 - i, i // 2)
DTYPES = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2", "I": "=i4", "F": "=f4"}


def image_of(mode, row, height=3):
    """An image of `mode` whose rows all hold `row` (width, or width x bands)."""
    pixels = np.broadcast_to(row, (height, *np.shape(row)))
    if mode == "1":
        return Image.fromarray(np.ascontiguousarray(pixels, dtype=bool))
    pixels = np.ascontiguousarray(pixels, dtype=DTYPES.get(mode, np.uint8))
    return Image.frombytes(mode, (pixels.shape[1], height), pixels.tobytes())


def saved(image, path, expected_mode=None, **options):
    """Write `image` to `path` and check that reading it back gives `expected_mode`."""
    image.save(path, **options)
    with Image.open(path) as reopened:
        assert reopened.mode == (expected_mode or image.mode)
    return path


def assert_rgb(image, expected_row, tolerance=1):
    """`image` is RGB and each row is `expected_row` (width x 3, or width for grey)."""
    assert image.mode == "RGB"
    expected = np.asarray(expected_row, dtype=np.float64)
    if expected.ndim == 1:
        expected = np.repeat(expected[:, None], 3, axis=1)
    pixels = np.asarray(image).astype(np.float64)
    assert pixels.shape[1:] == expected.shape
    worst = np.abs(pixels - expected[None]).max()
    assert worst <= tolerance, f"off by {worst}"


def over_white(colour, alpha):
    """Straight (not premultiplied) colour with alpha 0..255, composited over white."""
    colour = np.asarray(colour, np.float64).reshape(len(alpha), -1)
    alpha = np.asarray(alpha, np.float64)[:, None] / 255
    return np.rint(colour * alpha + 255 * (1 - alpha)) * np.ones(3)


def palette_image():
    image = image_of("P", X)
    image.putpalette(GREY_PALETTE.astype(np.uint8).tobytes())
    return image


# ---- the defect: a 16-bit greyscale PNG came out almost all white ---------------------


def test_16_bit_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    # The old load_rgb used image.convert("RGB"), which clips every value above 255 to 255.
    path = saved(image_of("I;16", DEEP), tmp_path / "deep.png")
    loaded = load_rgb(path)
    assert_rgb(loaded, np.rint(DEEP / 257), tolerance=0)
    assert (np.asarray(loaded) == 255).mean() < 0.01


# ---- greyscale, integer and float ------------------------------------------------------


def test_1_bit_png_is_black_and_white(tmp_path):
    bits = X >= WIDTH // 2
    path = saved(image_of("1", bits), tmp_path / "bits.png")
    assert_rgb(load_rgb(path), np.where(bits, 255, 0), tolerance=0)


def test_8_bit_grey_png_is_unchanged(tmp_path):
    path = saved(image_of("L", X), tmp_path / "grey.png")
    assert_rgb(load_rgb(path), X, tolerance=0)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_tiff_is_scaled_by_257(tmp_path, mode):
    path = saved(image_of(mode, DEEP), tmp_path / "deep.tif")
    assert_rgb(load_rgb(path), np.rint(DEEP / 257))


@pytest.mark.parametrize("mode", ["I;16", "I;16L", "I;16B", "I;16N"])
def test_every_16_bit_mode_in_memory(mode):
    image = image_of(mode, DEEP)
    assert image.mode == mode and image.getpixel((WIDTH - 1, 0)) == 65535
    assert_rgb(to_rgb(image), np.rint(DEEP / 257))


def test_32_bit_int_within_16_bits_is_scaled_as_16_bit(tmp_path):
    path = saved(image_of("I", DEEP), tmp_path / "int.tif")
    assert_rgb(load_rgb(path), np.rint(DEEP / 257))


def test_32_bit_int_beyond_16_bits_is_scaled_by_the_int32_range(tmp_path):
    top = 2**31 - 1
    values = np.rint(np.linspace(-(2**24), top, WIDTH))
    path = saved(image_of("I", values), tmp_path / "wide.tif")
    loaded = load_rgb(path)
    assert_rgb(loaded, np.rint(np.maximum(values, 0) / top * 255))
    assert loaded.getpixel((0, 0)) == (0, 0, 0) and loaded.getpixel((WIDTH - 1, 0)) == (255,) * 3


def test_float_up_to_1_is_scaled_by_255(tmp_path):
    values = np.linspace(0, 1, WIDTH)
    path = saved(image_of("F", values), tmp_path / "unit.tif")
    assert_rgb(load_rgb(path), np.rint(values * 255))


def test_float_above_1_is_taken_as_0_to_255_and_clipped(tmp_path):
    values = np.linspace(-40, 300, WIDTH)
    path = saved(image_of("F", values), tmp_path / "wide.tif")
    assert_rgb(load_rgb(path), np.clip(np.rint(values), 0, 255))


# ---- palettes and other colour spaces --------------------------------------------------


def test_palette_png_without_transparency(tmp_path):
    path = saved(palette_image(), tmp_path / "palette.png")
    assert_rgb(load_rgb(path), GREY_PALETTE, tolerance=0)


CMYK = np.stack([X, 255 - X, np.zeros_like(X), X // 2], axis=1)
# Pillow's naive CMYK (no colour profile): each of R, G, B is (255 - C) * (255 - K) / 255.
CMYK_AS_RGB = np.rint((255 - CMYK[:, :3]) * (255 - CMYK[:, 3:]) / 255)


def test_cmyk_tiff(tmp_path):
    path = saved(image_of("CMYK", CMYK), tmp_path / "cmyk.tif")
    assert_rgb(load_rgb(path), CMYK_AS_RGB)


def test_cmyk_jpeg_within_jpeg_loss(tmp_path):
    image = image_of("CMYK", CMYK, height=16)
    path = saved(image, tmp_path / "cmyk.jpg", quality=95, subsampling=0)
    # Lossy: at quality 95 a smooth gradient stays within a few levels of what was stored.
    assert_rgb(load_rgb(path), CMYK_AS_RGB, tolerance=6)


def test_ycbcr_tiff(tmp_path):
    y, cb, cr = X, 255 - X, np.full_like(X, 160)
    path = saved(image_of("YCbCr", np.stack([y, cb, cr], axis=1)), tmp_path / "ycbcr.tif")
    # Full-range YCbCr, as in JPEG (JFIF).
    red = y + 1.402 * (cr - 128)
    green = y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128)
    blue = y + 1.772 * (cb - 128)
    assert_rgb(load_rgb(path), np.clip(np.rint(np.stack([red, green, blue], axis=1)), 0, 255))


def test_lab_tiff_neutral_ramp_is_srgb_greys(tmp_path):
    # Lightness 0..100 as 0..255; a = b = 0, as signed bytes (TIFF's and frombytes' way;
    # Pillow holds them as 128).
    image = image_of("LAB", np.stack([X, np.zeros_like(X), np.zeros_like(X)], axis=1))
    assert image.getpixel((7, 0)) == (7, 128, 128)
    path = saved(image, tmp_path / "lab.tif")
    lightness = X * 100 / 255
    luminance = np.where(lightness > 8, ((lightness + 16) / 116) ** 3, lightness / 903.3)
    gamma = 1.055 * luminance ** (1 / 2.4) - 0.055
    srgb = np.where(luminance <= 0.0031308, 12.92 * luminance, gamma)
    # Pillow converts through littlecms with 8-bit steps: up to 2 levels off near white.
    assert_rgb(load_rgb(path), np.rint(srgb * 255), tolerance=2)


def test_lab_tiff_red_is_red(tmp_path):
    # sRGB red in CIELAB with the ICC reference white (D50): L 54.29, a 80.81, b 69.89.
    red = Image.new("LAB", (4, 4), (round(54.29 * 2.55), 128 + 81, 128 + 70))
    r, g, b = load_rgb(saved(red, tmp_path / "red.tif")).getpixel((1, 1))
    assert r >= 250 and g <= 5 and b <= 5


def test_hsv_in_memory():
    hsv = np.stack([X, 255 - X // 2, 255 - X // 4], axis=1)
    expected = [colorsys.hsv_to_rgb(*(hsv_pixel / 255)) for hsv_pixel in hsv]
    assert_rgb(to_rgb(image_of("HSV", hsv)), np.rint(np.asarray(expected) * 255))


# ---- transparency, composited over white -----------------------------------------------


def test_half_transparent_red_over_white(tmp_path):
    path = saved(Image.new("RGBA", (4, 4), (255, 0, 0, 128)), tmp_path / "red.png")
    r, g, b = load_rgb(path).getpixel((2, 2))
    assert r == 255 and abs(g - 128) <= 1 and abs(b - 128) <= 1


def test_rgba_png(tmp_path):
    rgba = np.stack([X, 255 - X, np.full_like(X, 60), X], axis=1)
    path = saved(image_of("RGBA", rgba), tmp_path / "rgba.png")
    assert_rgb(load_rgb(path), over_white(rgba[:, :3], X))


def test_la_png(tmp_path):
    path = saved(image_of("LA", np.stack([255 - X, X], axis=1)), tmp_path / "la.png")
    assert_rgb(load_rgb(path), over_white(255 - X, X))


def test_premultiplied_la_tiff(tmp_path):
    premultiplied = np.rint((255 - X) * X / 255)
    path = tmp_path / "la.tif"
    image_of("LA", np.stack([premultiplied, X], axis=1)).save(path)
    # Pillow writes only straight alpha (ExtraSamples 2); mark this one associated (1).
    straight = b"\x52\x01\x03\x00\x01\x00\x00\x00\x02\x00"
    raw = path.read_bytes()
    assert raw.count(straight) == 1
    path.write_bytes(raw.replace(straight, straight[:-2] + b"\x01\x00"))
    with Image.open(path) as reopened:
        assert reopened.mode == "La"
    # Premultiplied colour is not multiplied by alpha again.
    assert_rgb(load_rgb(path), np.rint(premultiplied + 255 * (1 - X / 255)))


def test_premultiplied_rgba_in_memory():
    premultiplied = np.rint(np.stack([X, 255 - X, np.full_like(X, 200)], axis=1) * X[:, None] / 255)
    image = image_of("RGBa", np.concatenate([premultiplied, X[:, None]], axis=1))
    assert image.mode == "RGBa"
    assert_rgb(to_rgb(image), np.rint(premultiplied + 255 * (1 - X[:, None] / 255)))


def test_palette_png_with_transparent_index(tmp_path):
    path = saved(palette_image(), tmp_path / "keyed.png", transparency=0)
    with Image.open(path) as reopened:
        assert reopened.info["transparency"] == 0
    expected = GREY_PALETTE.copy()
    expected[0] = 255
    assert_rgb(load_rgb(path), expected, tolerance=0)


def test_palette_png_with_alpha_per_entry(tmp_path):
    path = saved(palette_image(), tmp_path / "trns.png", transparency=bytes(range(256)))
    with Image.open(path) as reopened:
        assert reopened.info["transparency"] == bytes(range(256))
    assert_rgb(load_rgb(path), over_white(GREY_PALETTE, X))


def test_palette_with_alpha_band_tiff(tmp_path):
    image = image_of("PA", np.stack([X, X], axis=1))
    image.putpalette(GREY_PALETTE.astype(np.uint8).tobytes())
    path = saved(image, tmp_path / "pa.tif")
    assert_rgb(load_rgb(path), over_white(GREY_PALETTE, X))


@pytest.mark.parametrize(
    "mode, row, key",
    [("L", X, 100), ("RGB", GREY_PALETTE, (100, 155, 50)), ("I;16", X * 257, 25700)],
)
def test_transparent_colour_key_png(tmp_path, mode, row, key):
    # Column 100, and only it, holds the key.
    path = saved(image_of(mode, row), tmp_path / "keyed.png", transparency=key)
    with Image.open(path) as reopened:
        assert reopened.info["transparency"] == key
    expected = np.asarray(GREY_PALETTE if mode == "RGB" else X[:, None] * np.ones(3))
    expected[100] = 255
    assert_rgb(load_rgb(path), expected, tolerance=0)


def test_1_bit_png_with_transparent_black(tmp_path):
    bits = X >= WIDTH // 2
    path = saved(image_of("1", bits), tmp_path / "bits.png", transparency=0)
    with Image.open(path) as reopened:
        assert reopened.info["transparency"] == 0
    assert_rgb(load_rgb(path), np.full(WIDTH, 255), tolerance=0)


# ---- orientation and imports -----------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = saved(stored, tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    upright = load_rgb(path)
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 230 and top[2] < 25  # red on top
    assert bottom[2] > 230 and bottom[0] < 25  # blue below


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
def test_orientation_of_a_16_bit_tiff(tmp_path, compression):
    # Uncompressed, Pillow 13 scrambles this when the file is opened by name (memory-mapped).
    stored = np.zeros((20, 40))
    stored[:, 20:] = 65535  # left black, right white, as stored
    stored[0, 0] = 257 * 100  # one grey pixel, stored top left
    path = tmp_path / "rotated.tif"
    Image.frombytes("I;16", (40, 20), stored.astype("<u2").tobytes()).save(
        path, tiffinfo={274: 6}, compression=compression
    )
    upright = np.asarray(load_rgb(path))[..., 0]
    expected = np.rot90(np.rint(stored / 257), k=-1)  # 90 degrees clockwise
    assert upright.shape == (40, 20)
    assert np.array_equal(upright, expected)


def test_images_module_does_not_import_torch():
    code = "import sys, transfer_learning.images; sys.exit('torch' in sys.modules)"
    subprocess.run(
        [sys.executable, "-c", code], cwd=REPO / "workflow_scripts", check=True, timeout=60
    )


# ---- every kind of file a data set holds: grey, alpha, palette, CMYK, EXIF rotation -------


def test_load_rgb_makes_every_kind_upright_rgb(tmp_path):
    Image.new("L", (10, 10), 100).save(tmp_path / "grey.png")
    grey = load_rgb(tmp_path / "grey.png")
    assert grey.mode == "RGB" and grey.getpixel((3, 3)) == (100, 100, 100)

    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 255))
    rgba.paste((0, 255, 0, 0), (0, 0, 5, 10))  # left half fully transparent green
    rgba.save(tmp_path / "alpha.png")
    loaded = load_rgb(tmp_path / "alpha.png")
    assert loaded.mode == "RGB"
    assert loaded.getpixel((1, 1)) == (255, 255, 255)
    assert loaded.getpixel((8, 1)) == (255, 0, 0)

    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.info["transparency"] = 0
    palette.paste(0, (0, 0, 4, 8))
    palette.save(tmp_path / "palette.png")
    loaded = load_rgb(tmp_path / "palette.png")
    assert loaded.getpixel((1, 1)) == (255, 255, 255) and loaded.getpixel((6, 1)) == (0, 0, 255)

    Image.new("CMYK", (12, 12), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    with Image.open(tmp_path / "cmyk.jpg") as raw:
        assert raw.mode == "CMYK"
    r, g, b = load_rgb(tmp_path / "cmyk.jpg").getpixel((6, 6))
    assert r > 230 and g < 25 and b < 25

    rotated = Image.new("RGB", (40, 20), (255, 0, 0))
    rotated.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    rotated.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    upright = load_rgb(tmp_path / "rotated.jpg")
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 230 and top[2] < 25  # red on top
    assert bottom[2] > 230 and bottom[0] < 25  # blue below
