"""Images of image-text samples: open and check them at ingestion, identify them by content, decode them
for the processor, make thumbnails for the report.

An ``images`` field holds one image or a list of them, each a local path (absolute, or relative to the
data file's folder), raw bytes (a Parquet binary column), or a ``{"bytes", "path"}`` struct (the layout of
Hugging Face ``datasets`` Image columns). Every image is opened with Pillow at ingestion and refused, with
the reason, when it is missing, not an image, truncated, a decompression bomb (more than
:data:`MAX_IMAGE_PIXELS` pixels, checked from the header before any pixel is decoded) or in a mode the
processors cannot take without losing information (:data:`SUPPORTED_MODES`).

An image is known by the sha256 of its bytes (never by its path): the sample id hashes those, and the
workspace's ``images`` table keeps the bytes once per content hash (``storage/images.py``).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from valuegate.engine.sample import Problem

__all__ = [
    "MAX_IMAGE_PIXELS",
    "SUPPORTED_MODES",
    "CheckedImage",
    "check_image_bytes",
    "decode_image",
    "image_sha256",
    "images_from_field",
    "thumbnail_data_uri",
]

# Decompression-bomb cap: 40 megapixels (an 8000×5000 photo). VLM processors resize to well under one
# megapixel, so a larger image only costs memory; Pillow's own guard (89 MP warning, 179 MP error) is
# far above what a training set needs.
MAX_IMAGE_PIXELS = 40_000_000
# 8-bit modes every image processor converts to RGB without loss of meaning. 16-bit/float greyscale
# (I, I;16, F) and CMYK/YCbCr/LAB/HSV would be clipped or reinterpreted silently.
SUPPORTED_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "1")


@dataclass(frozen=True)
class CheckedImage:
    """An image that opened, decoded and passed every check."""

    data: bytes
    sha256: str
    width: int
    height: int
    format: str
    mode: str


def image_sha256(data: bytes) -> str:
    """sha256 (hex) of an image's bytes: its identity everywhere in valuegate."""
    return hashlib.sha256(data).hexdigest()


def check_image_bytes(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[CheckedImage | None, Problem | None]:
    """Open and fully decode an image, refusing what the processors cannot use.

    Returns:
        ``(image, None)`` or ``(None, problem)`` of the field ``images``; the problem names what is wrong (not
        an image, decompression bomb, unsupported mode, truncated or corrupt data).
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        return None, Problem("images", "empty file")
    try:
        with warnings.catch_warnings():  # the cap below decides, not Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return None, Problem("images", "not an image Pillow can read")
    except (OSError, ValueError, SyntaxError) as exc:
        return None, Problem("images", "cannot be opened as an image", detail=str(exc))
    with img:
        w, h = img.size
        if w * h > max_pixels:  # from the header: no pixel was decoded yet
            return None, Problem("images", "decompression bomb", detail=f"{w}×{h} = {w * h} pixels > {max_pixels}")
        if w < 1 or h < 1:
            return None, Problem("images", "empty image", detail=f"{w}×{h}")
        if img.mode not in SUPPORTED_MODES:
            return None, Problem("images", "unsupported mode",
                                 detail=f"{img.mode!r}; use one of {', '.join(SUPPORTED_MODES)}")
        try:
            img.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return None, Problem("images", "truncated or corrupt image data", detail=why)
        return CheckedImage(data, image_sha256(data), w, h, str(img.format or "unknown"), img.mode), None


def _one_image(value: Any, base_dir: Path | None) -> tuple[bytes | None, Problem | None]:
    """The bytes of one entry of an ``images`` field, or why they cannot be had."""
    if isinstance(value, dict):  # Hugging Face datasets Image struct: bytes win over the path
        if value.get("bytes"):
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            return None, Problem("images", "an image struct with neither bytes nor path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, str):
        if not value.strip():
            return None, Problem("images", "an empty path")
        p = Path(value).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        if not p.is_file():
            return None, Problem("images", "file not found", detail=value)
        try:
            return p.read_bytes(), None
        except OSError as exc:
            return None, Problem("images", "cannot be read", detail=f"{value}: {exc.strerror or exc}")
    return None, Problem("images", "expected a path, bytes or {bytes, path}", detail=f"got {type(value).__name__}")


def images_from_field(value: Any, base_dir: Path | None = None,
                      max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[list[CheckedImage] | None, Problem | None]:
    """Every image of a row's ``images`` field, opened and checked.

    Args:
        value: one image or a list (see the module docstring); a JSON list in a string (CSV) is parsed.
        base_dir: folder that relative paths are relative to (the data file's folder).
        max_pixels: the decompression-bomb cap.

    Returns:
        ``(images, None)`` ([] for an empty field) or ``(None, problem)`` of the first refused image (its
        ``at``: ``[k]``).
    """
    if value is None:
        return [], None
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, Problem("images", "a string that is neither a path nor a JSON list of paths")
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for k, item in enumerate(items):
        data, why = _one_image(item, base_dir)
        img, why = check_image_bytes(data, max_pixels) if data is not None else (None, why)
        if img is None:
            return None, Problem("images", "refused") if why is None else why._replace(at=f"[{k}]")
        out.append(img)
    return out, None


def decode_image(data: bytes) -> Any:
    """The image as an RGB ``PIL.Image`` (what every processor takes), pixels decoded."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if "A" in img.mode or img.mode == "P" else img.convert("RGB")
    return img


def thumbnail_data_uri(data: bytes, px: int = 96) -> str:
    """A small JPEG thumbnail (longest side ``px``) as a ``data:`` URI, for self-contained HTML."""
    img = decode_image(data)
    img.thumbnail((px, px))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
