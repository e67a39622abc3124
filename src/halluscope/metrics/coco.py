"""Reading the files the POPE and CHAIR scorers consume: COCO-format `instances` / `captions` JSON, and record
files (a JSON list or JSON Lines, whatever the extension: the published POPE files are JSON Lines named .json).
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from halluscope.errors import InputError

__all__ = [
    "CocoSource",
    "category_name",
    "image_objects",
    "known_image_ids",
    "load_coco",
    "load_coco_files",
    "read_records",
]

#: A COCO-format file: a path, or the already-loaded dict.
CocoSource = Union[str, Path, Mapping[str, Any]]


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON list or a JSON Lines file (one object per line, blank lines skipped).

    Raises:
        InputError: a missing file, or content that is neither form.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"file not found: {path}; pass a JSON list or JSON Lines file of records")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise InputError(
                    f"{path}: line {number} is not JSON ({err.msg}); expected a JSON list or JSON Lines"
                ) from None
        data = records
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputError(
            f"{path}: expected a list of JSON objects (a JSON list or JSON Lines), got {type(data).__name__}"
        )
    return data


def load_coco(source: CocoSource, *, kind: str = "instances") -> dict[str, Any]:
    """A COCO-format dict from a path or a dict, checked for the keys `kind` needs.

    Args:
        source: path to `instances_*.json` / `captions_*.json`, or the loaded dict.
        kind: "instances" (needs images, annotations, categories) or "captions" (needs annotations).

    Raises:
        InputError: missing file, not JSON, or a missing key.
    """
    if isinstance(source, Mapping):
        data = dict(source)
        origin = "the given dict"
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"COCO {kind} file not found: {path}; pass e.g. annotations/{kind}_val2014.json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise InputError(f"{path} is not JSON ({err.msg}); expected a COCO-format {kind} file") from None
        origin = str(path)
    needed = ("images", "annotations", "categories") if kind == "instances" else ("annotations",)
    missing = [key for key in needed if key not in data]
    if missing:
        raise InputError(f"{origin} lacks {missing}; expected a COCO-format {kind} file with keys {list(needed)}")
    return data


def load_coco_files(sources: CocoSource | Sequence[CocoSource] | None, *, kind: str) -> list[dict[str, Any]]:
    """`load_coco` over one source, several (e.g. train2014 and val2014), or None (no files)."""
    if sources is None:
        return []
    if isinstance(sources, (str, Path, Mapping)):
        sources = [sources]
    return [load_coco(source, kind=kind) for source in sources]


def known_image_ids(datasets: Iterable[Mapping[str, Any]]) -> set[Any]:
    """Every image id a set of COCO dicts knows: listed under "images" or referenced by an annotation."""
    ids: set[Any] = set()
    for data in datasets:
        ids.update(image["id"] for image in data.get("images", []))
        ids.update(ann["image_id"] for ann in data["annotations"])
    return ids


def category_name(annotation: Mapping[str, Any], names: Mapping[Any, str]) -> str:
    """The category name of an instance annotation, given the file's {category id: name}."""
    try:
        return names[annotation["category_id"]]
    except KeyError:
        raise InputError(
            f"annotation {annotation.get('id')!r} has category_id {annotation.get('category_id')!r}, which the "
            "file's categories do not define; fix the file's categories list"
        ) from None


def image_objects(instances: CocoSource) -> list[dict[str, Any]]:
    """Per image, its distinct category names in annotation order, read with pycocotools.

    This is the input the POPE builder takes ({"image", "image_id", "objects"} per image, in the order of the
    file's "images" list); "image" is the image's `file_name`.

    Example:
        >>> data = {"images": [{"id": 7, "file_name": "a.png"}], "categories": [{"id": 1, "name": "cat"}],
        ...         "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1}]}
        >>> image_objects(data)
        [{'image': 'a.png', 'image_id': 7, 'objects': ['cat']}]
    """
    from pycocotools.coco import COCO

    data = load_coco(instances, kind="instances")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    names = {cat["id"]: cat["name"] for cat in data["categories"]}
    out = []
    for image in data["images"]:
        objects: dict[str, None] = {}
        for ann in coco.imgToAnns.get(image["id"], []):
            objects[category_name(ann, names)] = None
        out.append(
            {"image": image.get("file_name", str(image["id"])), "image_id": image["id"], "objects": list(objects)}
        )
    return out
