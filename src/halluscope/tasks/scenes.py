"""Deterministic synthetic images drawn with PIL: counting scenes (n separated shapes) and colour scenes (one
shape in one clean colour). Everything is a function of the arguments and the seed; nothing touches the global
random state and nothing is downloaded."""

from __future__ import annotations

import difflib
import hashlib
import math
import random
from types import MappingProxyType
from typing import Mapping

from PIL import Image, ImageDraw

from halluscope.errors import InputError

__all__ = [
    "COLOR_RGB",
    "SHAPES",
    "SHAPE_PLURALS",
    "balanced_pair",
    "color_scene",
    "count_scene",
    "derive_seed",
    "max_objects",
]

#: Shape name -> plural noun used in counting prompts.
SHAPE_PLURALS: Mapping[str, str] = MappingProxyType(
    {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars", "diamond": "diamonds"}
)
#: The shapes both scene kinds can draw, in a fixed order (used to balance synthetic tasks).
SHAPES: tuple[str, ...] = tuple(SHAPE_PLURALS)

#: The six colours of the colour task and the exact RGB each is drawn with.
COLOR_RGB: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (255, 0, 0),
        "orange": (255, 140, 0),
        "yellow": (255, 230, 0),
        "green": (0, 160, 0),
        "blue": (0, 70, 255),
        "purple": (140, 0, 210),
    }
)

# Counting scenes: light plain backgrounds and saturated object colours far from them (matplotlib's tab10).
_COUNT_BACKGROUNDS = ((250, 250, 250), (245, 245, 238), (240, 244, 250), (250, 245, 236))
_COUNT_PALETTE = (
    (214, 39, 40),
    (31, 119, 180),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (23, 190, 207),
    (80, 80, 80),
    (188, 189, 34),
)
# Colour scenes: neutral greys (r == g == b) on which all six colours stand out.
_COLOR_BACKGROUND_LEVELS = (112, 128, 144, 160)
_MIN_SIZE = 32


def _layout(size: int) -> tuple[int, int, int, int]:
    """(margin, gap, smallest object, largest object) in pixels for a `size` x `size` counting scene."""
    margin = max(2, size // 40)
    gap = max(3, round(size * 0.02))
    d_min = max(10, round(size * 0.07))
    d_max = max(d_min, round(size * 0.25))
    return margin, gap, d_min, d_max


def balanced_pair(i: int, m: int, s: int) -> tuple[int, int]:
    """The (a, b) in range(m) x range(s) that item i of a balanced set gets.

    Every prefix of the sequence uses each a, and each b, a number of times that differs by at most one, and the
    first m * s items cover every pair exactly once: a = i % m, b = (i + i // lcm(m, s)) % s.

    Example:
        >>> sorted(balanced_pair(i, 2, 2) for i in range(4))
        [(0, 0), (0, 1), (1, 0), (1, 1)]
    """
    return i % m, (i + i // math.lcm(m, s)) % s


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed for one item of a generated set, stable across runs, platforms and `PYTHONHASHSEED`.

    Image i of a synthetic task is drawn with `derive_seed(seed, task, i)`, so it can be redrawn on its own.

    Example:
        >>> derive_seed(0, "count", 3) == derive_seed(0, "count", 3) != derive_seed(0, "count", 4)
        True
    """
    _check_seed(seed)
    text = "/".join(str(k) for k in (seed, *keys))
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def max_objects(size: int = 224) -> int:
    """The most objects `count_scene` can place at this image size, each >= 10 px and separated by a gap.

    Example:
        >>> max_objects(112) >= 20
        True
    """
    _check_size(size)
    margin, gap, d_min, _ = _layout(size)
    cells = (size - 2 * margin) // (d_min + gap)
    return cells * cells


def count_scene(n: int, shape: str, *, size: int = 224, seed: int) -> Image.Image:
    """Draw `n` non-overlapping `shape`s of varied colours and sizes on a plain light background.

    Objects sit in distinct cells of a jittered grid, so any two are at least `gap` pixels apart (>= 3 px) and
    each is at least 10 px wide; the count of connected non-background regions is exactly `n`.

    Args:
        n: number of objects, 1 <= n <= `max_objects(size)` (64 at 112 px, 100 at 224 px).
        shape: one of `SHAPES` ("circle", "square", "triangle", "star", "diamond").
        size: width and height in pixels (>= 32).
        seed: the same seed gives the same image, pixel for pixel.

    Returns:
        An RGB PIL image of `size` x `size`.

    Raises:
        InputError: unknown shape, bad size/seed, or `n` objects cannot fit.

    Example:
        >>> count_scene(5, "star", size=112, seed=0).size
        (112, 112)
    """
    _check_shape(shape)
    _check_size(size)
    _check_seed(seed)
    if not _is_int(n) or n < 1:
        raise InputError(f"object count n = {n!r}; expected an integer >= 1")
    capacity = max_objects(size)
    if n > capacity:
        raise InputError(
            f"cannot fit n = {n} separated objects (>= 10 px each) in a {size}x{size} image; at most {capacity} fit; "
            "use a larger size or a smaller n"
        )
    margin, gap, d_min, d_max = _layout(size)
    inner = size - 2 * margin
    grid = min(math.isqrt(capacity), math.ceil(math.sqrt(1.5 * n)))  # spare cells make the layout irregular
    edges = [margin + (k * inner) // grid for k in range(grid + 1)]
    cell = min(b - a for a, b in zip(edges, edges[1:]))
    d_hi = min(d_max, cell - gap)
    d_lo = max(d_min, (d_hi * 3) // 5)

    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), rng.choice(_COUNT_BACKGROUNDS))
    draw = ImageDraw.Draw(image)
    for index in rng.sample(range(grid * grid), n):
        row, col = divmod(index, grid)
        d = rng.randint(d_lo, d_hi)
        # the object spans [x0, x0 + d) and ends >= gap before the next cell starts
        x0 = rng.randint(edges[col], edges[col + 1] - gap - d)
        y0 = rng.randint(edges[row], edges[row + 1] - gap - d)
        _draw_shape(draw, shape, x0, y0, d, rng.choice(_COUNT_PALETTE))
    return image


def color_scene(color: str, shape: str, *, size: int = 224, seed: int) -> Image.Image:
    """Draw one `shape` filled with the exact RGB of `color` (see `COLOR_RGB`) on a neutral grey background.

    Args:
        color: one of "red", "orange", "yellow", "green", "blue", "purple".
        shape: one of `SHAPES`.
        size: width and height in pixels (>= 32).
        seed: picks the object's size and position and the grey level; same seed, same image.

    Returns:
        An RGB PIL image whose non-background pixels all equal `COLOR_RGB[color]` (no anti-aliasing).

    Raises:
        InputError: unknown colour or shape, bad size or seed.

    Example:
        >>> color_scene("red", "circle", size=112, seed=0).getpixel((0, 0))[0] in (112, 128, 144, 160)
        True
    """
    if color not in COLOR_RGB:
        raise InputError(
            f"unknown colour {color!r}{_did_you_mean(color, COLOR_RGB)}; expected one of {list(COLOR_RGB)}"
        )
    _check_shape(shape)
    _check_size(size)
    _check_seed(seed)
    rng = random.Random(seed)
    level = rng.choice(_COLOR_BACKGROUND_LEVELS)
    image = Image.new("RGB", (size, size), (level, level, level))
    margin = max(2, size // 20)
    d = rng.randint(round(size * 0.35), round(size * 0.6))
    x0 = rng.randint(margin, size - margin - d)
    y0 = rng.randint(margin, size - margin - d)
    _draw_shape(ImageDraw.Draw(image), shape, x0, y0, d, COLOR_RGB[color])
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: int, y0: int, d: int, fill: tuple[int, int, int]) -> None:
    """Fill `shape` inside the box [x0, x0 + d) x [y0, y0 + d), touching all four sides of the box."""
    x1, y1 = x0 + d - 1, y0 + d - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon(_fit_points(_UNIT_POLYGONS[shape], x0, y0, d), fill=fill)


def _star(points: int = 5, inner: float = 0.5) -> tuple[tuple[float, float], ...]:
    """A star pointing up; a fat inner radius keeps the arms joined at 10 px."""
    out = []
    for k in range(2 * points):
        radius = 1.0 if k % 2 == 0 else inner
        angle = -math.pi / 2 + k * math.pi / points
        out.append((radius * math.cos(angle), radius * math.sin(angle)))
    return tuple(out)


_UNIT_POLYGONS = {
    "triangle": ((0.5, 0.0), (1.0, 1.0), (0.0, 1.0)),
    "diamond": ((0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)),
    "star": _star(),
}


def _fit_points(points: tuple[tuple[float, float], ...], x0: int, y0: int, d: int) -> list[tuple[int, int]]:
    """Scale `points` uniformly into the d x d box at (x0, y0), centred, as integer pixel coordinates."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    w, h = max(xs) - min(xs), max(ys) - min(ys)
    scale = (d - 1) / max(w, h)
    ox = x0 + ((d - 1) - w * scale) / 2
    oy = y0 + ((d - 1) - h * scale) / 2
    return [(round(ox + (x - min(xs)) * scale), round(oy + (y - min(ys)) * scale)) for x, y in points]


def _check_shape(shape: str) -> None:
    if shape not in SHAPE_PLURALS:
        raise InputError(f"unknown shape {shape!r}{_did_you_mean(shape, SHAPES)}; expected one of {list(SHAPES)}")


def _check_size(size: int) -> None:
    if not _is_int(size) or size < _MIN_SIZE:
        raise InputError(f"image size = {size!r}; expected an integer >= {_MIN_SIZE} (e.g. 112 or 224)")


def _check_seed(seed: int) -> None:
    if not _is_int(seed):
        raise InputError(f"seed = {seed!r}; expected an integer")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _did_you_mean(name: object, options: object) -> str:
    close = difflib.get_close_matches(str(name), list(options), n=1)  # type: ignore[call-overload]
    return f" (did you mean {close[0]!r}?)" if close else ""
