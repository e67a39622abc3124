"""Where a benchmark's images and annotations come from: `synthetic` (object scenes drawn offline, the world the
scenes organism was trained on) or a directory of COCO-format annotations and images.

A directory holds `annotations/instances_*.json` (one file), optionally `annotations/captions_*.json` (the
reference captions CHAIR adds to the ground truth) and `annotations/vocabulary_*.txt` (CHAIR's synonyms; default
the COCO 80-category list), and the images under `images/` or the directory itself, by their `file_name`.
`write_scene_dataset` writes exactly this layout; for COCO val2014, link `val2014/` as `images/`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from halluscope.errors import InputError
from halluscope.metrics.coco import load_coco

__all__ = ["BenchData", "load_bench_data"]


@dataclass(frozen=True)
class BenchData:
    """A benchmark's source, loaded.

    Args:
        instances: the COCO-format instances dict.
        captions: the COCO-format reference captions dict, or None.
        vocabulary: CHAIR's synonym rows (node word first), or None for the COCO 80-category list.
        vocabulary_name: recorded in results ("shapes", "coco80").
        images: image id -> the image as PNG bytes (synthetic), or its `file_name` under `root` (a directory).
        root: the directory, or None for synthetic data.
    """

    instances: dict[str, Any]
    captions: dict[str, Any] | None
    vocabulary: list[list[str]] | None
    vocabulary_name: str
    images: dict[Any, bytes | str]
    root: Path | None = None

    def annotations(self, image_ids: set[Any]) -> dict[str, Any]:
        """The instances, reference captions and vocabulary restricted to `image_ids`: what scoring needs, small
        enough to keep in the run."""

        def subset(coco: dict[str, Any] | None) -> dict[str, Any] | None:
            if coco is None:
                return None
            return {**coco, "annotations": [a for a in coco["annotations"] if a["image_id"] in image_ids],
                    "images": [image for image in coco.get("images", []) if image["id"] in image_ids]}

        return {"instances": subset(self.instances), "captions": subset(self.captions),
                "vocabulary": self.vocabulary, "vocabulary_name": self.vocabulary_name}

    def image(self, image_id: Any) -> bytes | str:
        """Image `image_id`: its bytes, or the absolute path of its file.

        Raises:
            InputError: the file is in neither `root/images/` nor `root`.
        """
        found = self.images[image_id]
        if self.root is None:
            return found
        path = next((p for p in (self.root / "images" / found, self.root / found) if found and p.is_file()), None)
        if path is None:
            raise InputError(f"image {image_id} ({found!r}) is in neither {self.root / 'images'} nor {self.root}; "
                             f"put the images there (for COCO val2014, link val2014/ as images/)")
        return str(path.resolve())


def load_bench_data(data: str, *, n: int, seed: int, min_categories: int = 2) -> BenchData:
    """Load `data`: "synthetic" draws `n` scenes (with at least `min_categories` categories each) from `seed`;
    anything else is a directory as the module docstring describes.

    Raises:
        InputError: a missing directory, no or several instances files, or an image that is not there.
    """
    if data == "synthetic":
        return _synthetic(n=n, seed=seed, min_categories=min_categories)
    return _directory(Path(data).expanduser())


def _synthetic(*, n: int, seed: int, min_categories: int) -> BenchData:
    from halluscope.tasks.object_scenes import SCENE_SYNONYMS, SceneConfig, write_scene_dataset

    config = SceneConfig(min_categories=min_categories)
    with tempfile.TemporaryDirectory(prefix="halluscope-scenes-") as scratch:
        dataset = write_scene_dataset(scratch, n_images=n, seed=seed, config=config)
        instances = load_coco(dataset.instances)
        images = {image["id"]: (dataset.images / image["file_name"]).read_bytes() for image in instances["images"]}
        captions = load_coco(dataset.captions, kind="captions")
    rows = [list(SCENE_SYNONYMS[category]) for category in config.categories]
    return BenchData(instances, captions, rows, "shapes", images)


def _one(directory: Path, pattern: str, required: bool) -> Path | None:
    found = sorted(directory.glob(pattern))
    if len(found) > 1 or (required and not found):
        raise InputError(f"{directory} holds {len(found)} files matching {pattern} ({', '.join(p.name for p in found)}"
                         f"); expected {'exactly one' if required else 'at most one'}: keep one per data directory")
    return found[0] if found else None


def _directory(root: Path) -> BenchData:
    from halluscope.metrics.vocabulary import parse_synonym_lines

    if not root.is_dir():
        raise InputError(f"--data {str(root)!r} is neither 'synthetic' nor a directory; pass 'synthetic' or a "
                         f"directory with annotations/instances_*.json and images/")
    annotations = root / "annotations"
    instances = load_coco(_one(annotations, "instances_*.json", required=True))
    captions_file = _one(annotations, "captions_*.json", required=False)
    vocabulary_file = _one(annotations, "vocabulary_*.txt", required=False)
    images = {image["id"]: image.get("file_name", "") for image in instances["images"]}
    if vocabulary_file is None:
        rows, name = None, "coco80"
    else:
        rows = parse_synonym_lines(vocabulary_file.read_text(encoding="utf-8").splitlines())
        name = vocabulary_file.stem.removeprefix("vocabulary_")
    captions = load_coco(captions_file, kind="captions") if captions_file else None
    return BenchData(instances, captions, rows, name, images, root.resolve())
