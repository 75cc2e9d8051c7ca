"""A small synthetic image data set in the workflow's layout, for laptops and CI.

Each class is a shape (ellipse, box, triangle, cross, ...) drawn at a random size, position,
rotation and colour on a noisy textured background, with a distractor blob of another kind,
so a CNN can learn it but not from one pixel statistic.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .errors import UserError

SHAPES = ("ellipse", "box", "triangle", "cross", "ring", "star")
# Each class also has its own fill pattern, so texture carries the class as well as outline.
PATTERNS = ("solid", "stripes", "checks", "solid", "stripes", "checks")


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    if kind == "triangle":
        corners = [angle + k * 2 * math.pi / 3 for k in range(3)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in corners]
    if kind == "box":
        corners = [angle + math.pi / 4 + k * math.pi / 2 for k in range(4)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in corners]
    if kind == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            a = angle + k * math.pi / 5
            points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
        return points
    raise ValueError(kind)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx, cy, r, angle, colour) -> None:
    if kind == "ellipse":
        ratio = 0.6 + 0.4 * abs(math.sin(angle))
        draw.ellipse([cx - r, cy - r * ratio, cx + r, cy + r * ratio], fill=colour)
    elif kind == "ring":
        width = max(2, int(r * 0.35))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=width)
    elif kind == "cross":
        w = r * 0.35
        for a in (angle, angle + math.pi / 2):
            dx, dy = math.cos(a), math.sin(a)
            px, py = -dy * w, dx * w
            draw.polygon(
                [
                    (cx - dx * r + px, cy - dy * r + py),
                    (cx + dx * r + px, cy + dy * r + py),
                    (cx + dx * r - px, cy + dy * r - py),
                    (cx - dx * r - px, cy - dy * r - py),
                ],
                fill=colour,
            )
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=colour)


def _pattern_mask(pattern: str, size: int, rng: random.Random) -> Image.Image | None:
    if pattern == "solid":
        return None
    period = rng.randint(3, 5)
    y, x = np.mgrid[0:size, 0:size]
    if pattern == "stripes":
        angle = rng.uniform(0, math.pi)
        wave = (x * math.cos(angle) + y * math.sin(angle)) // period
    else:
        wave = x // period + y // period
    return Image.fromarray(np.uint8((wave % 2) * 255))


def make_image(kind: str, size: int, rng: random.Random, pattern: str = "solid") -> Image.Image:
    nprng = np.random.default_rng(rng.getrandbits(32))
    base = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float32)
    # Low-frequency texture plus pixel noise: the background alone says nothing of the class.
    coarse = nprng.normal(0, 40, (4, 4, 3)).astype(np.float32)
    texture = np.array(
        Image.fromarray(np.uint8(np.clip(coarse + 128, 0, 255))).resize((size, size))
    ).astype(np.float32)
    pixels = base + (texture - 128) + nprng.normal(0, 6, (size, size, 3))
    image = Image.fromarray(np.uint8(np.clip(pixels, 0, 255)))
    draw = ImageDraw.Draw(image)
    # A distractor of a random other kind, smaller, so position and colour never decide.
    other = rng.choice([s for s in SHAPES if s != kind])
    _draw_shape(
        draw,
        other,
        rng.uniform(0, size),
        rng.uniform(0, size),
        size * rng.uniform(0.06, 0.12),
        rng.uniform(0, 2 * math.pi),
        tuple(rng.randint(0, 255) for _ in range(3)),
    )
    r = size * rng.uniform(0.25, 0.4)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    colour = tuple(int((c + rng.randint(80, 175)) % 256) for c in base)
    angle = rng.uniform(0, 2 * math.pi)
    _draw_shape(draw, kind, cx, cy, r, angle, colour)
    mask = _pattern_mask(pattern, size, rng)
    if mask is not None:
        # Paint the pattern's second colour only inside the shape.
        shape_mask = Image.new("L", (size, size), 0)
        _draw_shape(ImageDraw.Draw(shape_mask), kind, cx, cy, r, angle, 255)
        second = Image.new("RGB", (size, size), tuple(255 - c for c in colour))
        combined = Image.fromarray(np.minimum(np.array(mask), np.array(shape_mask)))
        image.paste(second, (0, 0), combined)
    return image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.0, 0.8)))


def make_demo_dataset(
    root: str | os.PathLike,
    counts: Mapping[str, Mapping[str, int]],
    image_size: int = 64,
    seed: int = 0,
) -> dict[str, str]:
    """Write `<root>/<split>/<class>/<class>.<n>.jpg`; classes take shapes in sorted order.

    The tree is built beside `root` and renamed into place, so a killed run leaves no half
    data set behind. Returns class -> shape.
    """
    root = Path(root)
    classes = sorted({label for per_class in counts.values() for label in per_class})
    if len(classes) > len(SHAPES):
        raise UserError(f"the demo draws at most {len(SHAPES)} classes, got {len(classes)}")
    shape_of = dict(zip(classes, SHAPES, strict=False))
    pattern_of = dict(zip(classes, PATTERNS, strict=False))
    partial = root.with_name(f".{root.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    serial = 0
    for split, per_class in counts.items():
        for label in classes:
            folder = partial / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(per_class.get(label, 0)):
                serial += 1
                rng = random.Random(f"{seed}-{serial}")
                image = make_image(shape_of[label], image_size, rng, pattern_of[label])
                image.save(folder / f"{label}.{serial}.jpg", quality=90)
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, root)
    return shape_of
