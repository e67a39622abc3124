"""Synthetic COCO-like object scenes: small images of coloured shapes, written as real COCO-format `instances` and
`captions` files plus PNGs, so POPE and CHAIR run end to end with nothing downloaded.

Each image holds 2-5 of 12 shape categories (1-2 instances each) in six colours and varied sizes, some
overlapping. Which categories share an image follows a configurable co-occurrence structure: categories come in
groups, by default the neighbouring pairs of a ring (circle-square, square-crescent, ..., bolt-circle), and each
further category is, with probability `cohesion`, a group partner of one already present, so a scene is mostly
an arc of the ring. That structure is what POPE's adversarial split probes, and what a model trained on these
scenes can learn as a prior and then hallucinate.

The scenes bring their own CHAIR vocabulary (`SCENE_SYNONYMS`, written as `annotations/vocabulary_<name>.txt` in the
reference's synonym-file format), rather than borrowing COCO category names, so every caption word that names a
shape maps to exactly one category. Everything is a function of the seed; nothing touches global random state.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from PIL import Image, ImageDraw

from halluscope.errors import InputError
from halluscope.tasks.scenes import COLOR_RGB, derive_seed

__all__ = [
    "SCENE_GROUPS",
    "SCENE_RING",
    "SCENE_SYNONYMS",
    "ObjectScene",
    "SceneConfig",
    "SceneDataset",
    "draw_object_scene",
    "list_phrases",
    "object_phrase",
    "plural",
    "write_scene_dataset",
]

#: Category -> the words captions use for it; the first is the category name (CHAIR's node word).
SCENE_SYNONYMS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "circle": ("circle", "disc", "dot"),
        "square": ("square", "block"),
        "triangle": ("triangle",),
        "star": ("star",),
        "diamond": ("diamond", "lozenge"),
        "heart": ("heart",),
        "cross": ("cross",),
        "hexagon": ("hexagon",),
        "crescent": ("crescent", "moon"),
        "chevron": ("chevron",),
        "bowtie": ("bowtie",),
        "bolt": ("bolt",),
    }
)
#: The categories in ring order: each co-occurs with its two neighbours (the last with the first).
SCENE_RING: tuple[str, ...] = (
    "circle", "square", "crescent", "triangle", "star", "chevron", "diamond", "heart", "bowtie", "cross", "hexagon",
    "bolt",
)
#: Default co-occurrence groups, the neighbouring pairs of `SCENE_RING`: categories in one group tend to appear
#: together. A ring rather than disjoint pairs: with pairs, an image's partner is nearly always present, so POPE's
#: adversarial negatives (the most co-occurring absent objects) differ little from random ones; on a ring the
#: objects just beyond a scene's arc are both strongly co-occurring and absent.
SCENE_GROUPS: tuple[tuple[str, ...], ...] = tuple(
    (SCENE_RING[k], SCENE_RING[(k + 1) % len(SCENE_RING)]) for k in range(len(SCENE_RING))
)

_BACKGROUNDS = {
    "white": (250, 250, 250),
    "grey": (228, 228, 228),
    "cream": (246, 240, 226),
    "pale blue": (230, 238, 248),
}
_NUMBERS = {2: "two", 3: "three", 4: "four"}
_MIN_SIDE = 12  # px: the smallest object drawn
_MAX_SHARED = 0.3  # an overlapping object covers at most this share of the smaller of two boxes


def _regular(n: int, start: float = -math.pi / 2, radius: float = 0.5) -> tuple[tuple[float, float], ...]:
    return tuple(
        (0.5 + radius * math.cos(start + 2 * math.pi * k / n), 0.5 + radius * math.sin(start + 2 * math.pi * k / n))
        for k in range(n)
    )


def _star_points() -> tuple[tuple[float, float], ...]:
    return tuple(
        (0.5 + r * math.cos(-math.pi / 2 + k * math.pi / 5), 0.5 + r * math.sin(-math.pi / 2 + k * math.pi / 5))
        for k, r in ((k, 0.5 if k % 2 == 0 else 0.25) for k in range(10))
    )


def _heart_points(n: int = 40) -> tuple[tuple[float, float], ...]:
    raw = [
        (16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)))
        for t in (2 * math.pi * k / n for k in range(n))
    ]
    return tuple(((x + 17) / 34, (y + 17.5) / 34) for x, y in raw)


def _crescent_points(n: int = 16) -> tuple[tuple[float, float], ...]:
    """A moon opening to the right: the left arc of the unit disc, back along a circle centred further right."""
    outer = [(0.5 + 0.5 * math.cos(a), 0.5 + 0.5 * math.sin(a))
             for a in (math.radians(50 + 260 * k / n) for k in range(n + 1))]
    (x_start, y_start), (x_end, y_end) = outer[0], outer[-1]
    centre = 0.8
    radius = math.hypot(x_start - centre, y_start - 0.5)
    first = math.atan2(y_start - 0.5, x_start - centre) % (2 * math.pi)
    last = math.atan2(y_end - 0.5, x_end - centre) % (2 * math.pi)
    angles = (last - (last - first) * k / n for k in range(1, n))
    inner = [(centre + radius * math.cos(a), 0.5 + radius * math.sin(a)) for a in angles]
    return tuple(outer + inner)


_third, _two_thirds = 1 / 3, 2 / 3
#: Category -> polygon in the unit square, drawn and written as the instance's segmentation.
_POLYGONS: Mapping[str, tuple[tuple[float, float], ...]] = MappingProxyType(
    {
        "circle": _regular(32),
        "square": ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)),
        "triangle": ((0.5, 0.0), (1.0, 1.0), (0.0, 1.0)),
        "star": _star_points(),
        "diamond": ((0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)),
        "heart": _heart_points(),
        "cross": (
            (_third, 0.0),
            (_two_thirds, 0.0),
            (_two_thirds, _third),
            (1.0, _third),
            (1.0, _two_thirds),
            (_two_thirds, _two_thirds),
            (_two_thirds, 1.0),
            (_third, 1.0),
            (_third, _two_thirds),
            (0.0, _two_thirds),
            (0.0, _third),
            (_third, _third),
        ),
        "hexagon": _regular(6, start=0.0),
        "crescent": _crescent_points(),
        "chevron": ((0.0, 0.55), (0.5, 0.05), (1.0, 0.55), (1.0, 0.95), (0.5, 0.45), (0.0, 0.95)),
        "bowtie": ((0.0, 0.0), (0.5, 0.35), (1.0, 0.0), (1.0, 1.0), (0.5, 0.65), (0.0, 1.0)),
        "bolt": ((0.55, 0.0), (0.15, 0.55), (0.45, 0.55), (0.3, 1.0), (0.85, 0.4), (0.55, 0.4), (0.75, 0.0)),
    }
)


@dataclass(frozen=True)
class SceneConfig:
    """What a synthetic scene set contains.

    Args:
        categories: the shape categories used (a subset of `SCENE_SYNONYMS`).
        groups: co-occurrence groups (they may overlap: a category's partners are the other members of every
            group it is in); categories in no group only ever appear by the uniform draw.
        cohesion: chance that each category after the first is a group partner of one already present (when one
            is left); otherwise it is drawn uniformly from the unused categories.
        min_categories, max_categories: distinct categories per image. POPE needs >= 3 present and 3 absent
            categories per image, which the defaults (2-5 of 12) give to most images.
        max_instances: instances per category, 1..max_instances.
        overlap: chance that an object may overlap earlier ones (by at most 30% of the smaller box).
        size: image side in pixels (>= 64).
        captions_per_image: reference captions per image (COCO has 5).
    """

    categories: tuple[str, ...] = tuple(SCENE_SYNONYMS)
    groups: tuple[tuple[str, ...], ...] = SCENE_GROUPS
    cohesion: float = 0.8
    min_categories: int = 2
    max_categories: int = 5
    max_instances: int = 2
    overlap: float = 0.3
    size: int = 112
    captions_per_image: int = 5

    def __post_init__(self) -> None:
        unknown = [c for c in self.categories if c not in SCENE_SYNONYMS]
        if unknown or len(set(self.categories)) != len(self.categories) or not self.categories:
            raise InputError(
                f"scene categories {list(self.categories)}: expected distinct names from {list(SCENE_SYNONYMS)}"
            )
        if any(c not in self.categories for g in self.groups for c in g) or any(len(set(g)) < 2 for g in self.groups):
            raise InputError(f"scene groups {self.groups}: each member must be a listed category, and each group "
                             f"must hold at least two distinct categories")
        if not 1 <= self.min_categories <= self.max_categories <= len(self.categories):
            raise InputError(
                f"min_categories = {self.min_categories}, max_categories = {self.max_categories}; expected "
                f"1 <= min <= max <= {len(self.categories)} (the number of categories)"
            )
        for name in ("cohesion", "overlap"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} = {getattr(self, name)!r}; expected a probability in [0, 1]")
        if self.max_instances < 1 or self.captions_per_image < 1 or self.size < 64:
            raise InputError(
                f"max_instances = {self.max_instances}, captions_per_image = {self.captions_per_image}, size = "
                f"{self.size}; expected >= 1, >= 1 and >= 64"
            )

    def partners(self, category: str) -> tuple[str, ...]:
        """The categories that share a co-occurrence group with `category`."""
        return tuple(member for group in self.groups if category in group for member in group if member != category)


class ObjectScene(NamedTuple):
    """One drawn scene: the image, its objects (category, colour, bbox [x, y, w, h], polygon) and captions."""

    image: Image.Image
    objects: list[dict[str, Any]]
    captions: list[str]


class SceneDataset(NamedTuple):
    """Paths of a written scene set."""

    root: Path
    images: Path
    instances: Path
    captions: Path
    vocabulary: Path


def _pick_categories(rng: random.Random, config: SceneConfig) -> list[str]:
    chosen = [rng.choice(config.categories)]
    target = rng.randint(config.min_categories, config.max_categories)
    while len(chosen) < target:
        partners = [p for c in chosen for p in config.partners(c) if p not in chosen]
        if partners and rng.random() < config.cohesion:
            chosen.append(rng.choice(partners))
        else:
            chosen.append(rng.choice([c for c in config.categories if c not in chosen]))
    return chosen


def _shared(a: Sequence[int], b: Sequence[int]) -> float:
    """Intersection of boxes a and b ([x, y, side]) over the smaller box's area; touching within 2 px counts."""
    ix = min(a[0] + a[2] + 2, b[0] + b[2] + 2) - max(a[0], b[0])
    iy = min(a[1] + a[2] + 2, b[1] + b[2] + 2) - max(a[1], b[1])
    if ix <= 0 or iy <= 0:
        return 0.0
    return ix * iy / min(a[2], b[2]) ** 2


def _place(rng: random.Random, boxes: list[list[int]], size: int, may_overlap: bool) -> list[int] | None:
    """A box [x, y, side] that keeps clear of (or overlaps little with) `boxes`, shrinking until one fits."""
    margin = max(2, size // 40)
    side = rng.randint(round(size * 0.16), round(size * 0.32))
    while side >= _MIN_SIDE:
        for _ in range(40):
            box = [rng.randint(margin, size - margin - side), rng.randint(margin, size - margin - side), side]
            limit = _MAX_SHARED if may_overlap else 0.0
            if all(_shared(box, other) <= limit for other in boxes):
                return box
        side = int(side * 0.85)
    return None


def draw_object_scene(index: int, *, seed: int, config: SceneConfig | None = None) -> ObjectScene:
    """Draw scene `index` of the set with this seed: categories, instances, image and reference captions.

    The scene depends only on (seed, index, config), so any one scene can be redrawn on its own. An instance
    that finds no room is left out, and a category with no instance left is not in the scene.

    Example:
        >>> scene = draw_object_scene(0, seed=0)
        >>> scene.image.size, len(scene.captions)
        ((112, 112), 5)
    """
    config = config or SceneConfig()
    rng = random.Random(derive_seed(seed, "object-scene", index))
    background = rng.choice(list(_BACKGROUNDS))
    image = Image.new("RGB", (config.size, config.size), _BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    boxes: list[list[int]] = []
    objects = []
    for category in _pick_categories(rng, config):
        for _ in range(rng.randint(1, config.max_instances)):
            box = _place(rng, boxes, config.size, rng.random() < config.overlap)
            if box is None:
                continue
            boxes.append(box)
            x0, y0, side = box
            polygon = [(x0 + px * (side - 1), y0 + py * (side - 1)) for px, py in _POLYGONS[category]]
            colour = rng.choice(list(COLOR_RGB))
            draw.polygon([(round(x), round(y)) for x, y in polygon], fill=COLOR_RGB[colour])
            xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
            objects.append(
                {
                    "category": category,
                    "colour": colour,
                    "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                    "polygon": polygon,
                }
            )
    captions = [_caption(rng, objects, background) for _ in range(config.captions_per_image)]
    return ObjectScene(image, objects, captions)


def _with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def plural(word: str) -> str:
    """The plural of a shape noun ("cross" -> "crosses")."""
    return word + ("es" if word.endswith(("s", "x", "sh", "ch")) else "s")


def object_phrase(word: str, colours: Sequence[str], *, colour: bool) -> str:
    """How a caption names one category's instances, given their colours: "a red circle", "a circle",
    "two blue squares", "two squares" (`colour`: say the colour, which all instances must then share).

    Raises:
        InputError: no colours, or `colour` for instances of several colours.

    Example:
        >>> object_phrase("cross", ["blue", "blue"], colour=True)
        'two blue crosses'
    """
    if not colours or (colour and len(set(colours)) != 1):
        raise InputError(f"colours {list(colours)!r} with colour={colour}; pass one colour per instance, and "
                         f"colour=True only when they are all the same")
    noun = word if len(colours) == 1 else plural(word)
    noun = f"{colours[0]} {noun}" if colour else noun
    return _with_article(noun) if len(colours) == 1 else f"{_NUMBERS.get(len(colours), str(len(colours)))} {noun}"


def list_phrases(phrases: Sequence[str]) -> str:
    """Phrases joined as a list: "a, b and c".

    Example:
        >>> list_phrases(["a dot", "two blocks", "a star"])
        'a dot, two blocks and a star'
    """
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _caption(rng: random.Random, objects: list[dict[str, Any]], background: str) -> str:
    """One truthful reference caption naming some of the scene's categories, with counts, colours and synonyms."""
    by_category: dict[str, list[str]] = {}
    for obj in objects:
        by_category.setdefault(obj["category"], []).append(obj["colour"])
    named = list(by_category)
    rng.shuffle(named)
    named = named[: rng.randint(max(1, len(named) - 2), len(named))]
    phrases = []
    for category in named:
        colours = by_category[category]
        word = rng.choice(SCENE_SYNONYMS[category])
        same_colour = len(set(colours)) == 1 and rng.random() < 0.6
        phrases.append(object_phrase(word, colours, colour=same_colour))
    listed = list_phrases(phrases)
    text = rng.choice(
        (
            "{} on a {} background.",
            "a picture of {} on a {} background.",
            "this image shows {} over a {} background.",
            "{} drawn on a plain {} background.",
        )
    ).format(listed, background)
    return text[0].upper() + text[1:]


def write_scene_dataset(
    out_dir: str | Path, *, n_images: int, seed: int, config: SceneConfig | None = None, name: str = "shapes"
) -> SceneDataset:
    """Write `n_images` scenes as PNGs plus COCO-format `instances_<name>.json`, `captions_<name>.json` and the
    CHAIR vocabulary `vocabulary_<name>.txt`; image ids run 1..n_images.

    Layout: `<out_dir>/images/<name>_<id:06d>.png`, `<out_dir>/annotations/...`. The same arguments write the
    same files.

    Example:
        >>> ds = write_scene_dataset(tmp_path, n_images=4, seed=0)  # doctest: +SKIP
        >>> ds.instances.name  # doctest: +SKIP
        'instances_shapes.json'
    """
    config = config or SceneConfig()
    if not isinstance(n_images, int) or isinstance(n_images, bool) or n_images < 1:
        raise InputError(f"n_images = {n_images!r}; expected a positive integer")
    root = Path(out_dir)
    images_dir, ann_dir = root / "images", root / "annotations"
    images_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    category_ids = {category: k for k, category in enumerate(config.categories, start=1)}
    images, instances, captions = [], [], []
    for image_id in range(1, n_images + 1):
        scene = draw_object_scene(image_id - 1, seed=seed, config=config)
        file_name = f"{name}_{image_id:06d}.png"
        scene.image.save(images_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "width": config.size, "height": config.size})
        for obj in scene.objects:
            instances.append(
                {
                    "id": len(instances) + 1,
                    "image_id": image_id,
                    "category_id": category_ids[obj["category"]],
                    "segmentation": [[round(v, 2) for point in obj["polygon"] for v in point]],
                    "area": round(_polygon_area(obj["polygon"]), 2),
                    "bbox": [round(v, 2) for v in obj["bbox"]],
                    "iscrowd": 0,
                    "colour": obj["colour"],
                }
            )
        for text in scene.captions:
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": text})
    info = {
        "description": f"halluscope synthetic object scenes ({name})",
        "seed": seed,
        "config": _config_record(config),
    }
    categories = [{"id": k, "name": c, "supercategory": "shape"} for c, k in category_ids.items()]
    paths = SceneDataset(
        root,
        images_dir,
        ann_dir / f"instances_{name}.json",
        ann_dir / f"captions_{name}.json",
        ann_dir / f"vocabulary_{name}.txt",
    )
    _write_json(
        paths.instances,
        {"info": info, "licenses": [], "images": images, "annotations": instances, "categories": categories},
    )
    _write_json(paths.captions, {"info": info, "licenses": [], "images": images, "annotations": captions})
    paths.vocabulary.write_text(
        "".join(", ".join(SCENE_SYNONYMS[c]) + "\n" for c in config.categories), encoding="utf-8"
    )
    return paths


def _polygon_area(points: Sequence[tuple[float, float]]) -> float:
    return abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, [*points[1:], points[0]]))) / 2


def _config_record(config: SceneConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(config)}


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
