"""Turning whatever a user hands us (a path, encoded bytes, a PIL image) into an RGB PIL image, with
one-line errors for files that are missing or are not images."""

from __future__ import annotations

import io
import os
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

from halluscope.errors import InputError

__all__ = ["ImageLike", "open_image", "image_to_png_bytes"]

ImageLike = Union[str, os.PathLike, bytes, bytearray, Image.Image]


def open_image(image: ImageLike) -> Image.Image:
    """Decode `image` to an RGB PIL image, honouring EXIF orientation and flattening alpha onto white.

    Raises:
        InputError: the path does not exist, or the bytes/file are not a decodable image.
    """
    if isinstance(image, Image.Image):
        img = image
    else:
        if isinstance(image, (bytes, bytearray)):
            source, label = io.BytesIO(image), f"<{len(image)} bytes>"
        elif isinstance(image, (str, os.PathLike)):
            if not os.path.isfile(image):
                raise InputError(f"image file not found: {os.fspath(image)!r}; pass an existing image path, bytes or a PIL image")
            source, label = os.fspath(image), repr(os.fspath(image))
        else:
            raise InputError(
                f"unsupported image type {type(image).__name__}; pass a file path, encoded bytes or a PIL.Image"
            )
        try:
            img = Image.open(source)
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"cannot decode image {label}: {exc}; pass a PNG/JPEG/other PIL-readable image") from None
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def image_to_png_bytes(image: Image.Image) -> bytes:
    """Encode a PIL image losslessly as PNG bytes (deterministic for a given image)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
