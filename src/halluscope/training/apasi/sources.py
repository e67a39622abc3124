"""Where APASI's images come from, and which object vocabulary reads the descriptions of them.

`synthetic` draws object scenes offline (`tasks/object_scenes.py`, the world the scenes organism knows) and reads
descriptions with the scenes' own vocabulary. A directory holds images, in `DIR/images/` or `DIR` itself (COCO's
train2017, for instance; APASI needs no annotations); its vocabulary is `DIR/annotations/vocabulary_*.txt` when
there is one (a written scene set has it) and the 80 COCO categories otherwise.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from halluscope.errors import InputError
from halluscope.metrics.vocabulary import ObjectVocabulary, coco_vocabulary, load_vocabulary

__all__ = ["IMAGE_SUFFIXES", "ImageSet", "load_images"]

#: The image files a directory source takes.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageSet(NamedTuple):
    """The images (a table of `image_id` and `image`: PNG bytes, or a file's absolute path), the vocabulary that
    reads their descriptions, the source as a run records it ("synthetic" or the resolved directory), and each
    image's objects where they are known (synthetic scenes), else None."""

    table: pd.DataFrame
    vocabulary: ObjectVocabulary
    source: str
    truth: dict[int, frozenset[str]] | None = None


def load_images(images: str, *, n: int, seed: int) -> ImageSet:
    """`n` images from `images`: "synthetic" draws scenes 0..n-1 of `seed`; a directory gives `n` of its images
    drawn with `seed` (all of them, in name order, when `n` is their number).

    Raises:
        InputError: not "synthetic" and not a directory, a directory without images, more images asked for than
            it holds, or two vocabulary files.

    Example:
        >>> load_images("synthetic", n=2, seed=1).table["image_id"].tolist()
        [0, 1]
    """
    if n < 1:
        raise InputError(f"--n {n}; expected at least 1 image")
    if images == "synthetic":
        return _synthetic(n, seed)
    return _directory(Path(images).expanduser(), n, seed)


def _synthetic(n: int, seed: int) -> ImageSet:
    from halluscope.tasks.object_scenes import SCENE_SYNONYMS, SceneConfig, draw_object_scene

    config = SceneConfig()
    encoded, truth = [], {}
    for index in range(n):
        scene = draw_object_scene(index, seed=seed, config=config)
        buffer = io.BytesIO()
        scene.image.save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
        truth[index] = frozenset(obj["category"] for obj in scene.objects)
    vocabulary = ObjectVocabulary.from_synonyms("shapes", [list(SCENE_SYNONYMS[c]) for c in config.categories])
    return ImageSet(pd.DataFrame({"image_id": range(n), "image": encoded}), vocabulary, "synthetic", truth)


def _directory(root: Path, n: int, seed: int) -> ImageSet:
    if not root.is_dir():
        raise InputError(f"--images {str(root)!r} is neither 'synthetic' nor a directory; pass 'synthetic' or a "
                         f"directory of images (or one with images/ inside)")
    folder = root / "images" if (root / "images").is_dir() else root
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); pass a directory of images")
    if n > len(files):
        raise InputError(f"--n {n} is more than the {len(files)} images in {folder}; pass --n {len(files)} or less")
    chosen = files if n == len(files) else sorted(random.Random(seed).sample(files, n))
    table = pd.DataFrame({"image_id": [p.relative_to(folder).as_posix() for p in chosen],
                          "image": [str(p.resolve()) for p in chosen]})
    found = sorted((root / "annotations").glob("vocabulary_*.txt"))
    if len(found) > 1:
        raise InputError(f"{root / 'annotations'} holds {len(found)} vocabulary files "
                         f"({', '.join(p.name for p in found)}); keep one")
    vocabulary = (load_vocabulary(found[0], name=found[0].stem.removeprefix("vocabulary_")) if found
                  else coco_vocabulary())
    return ImageSet(table, vocabulary, str(root.resolve()))
