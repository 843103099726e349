"""Reading images from disk with clear errors and a size bound."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from covspec.errors import ImageError

MAX_IMAGE_PIXELS = 4096 * 4096  # bound on decoded size; larger images are refused, not resized
MAX_IMAGE_BYTES = 32 * 1024 * 1024


def load_image(source: str | Path | bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Opens an image file (or encoded bytes) as RGB, refusing unreadable or oversized input."""
    if isinstance(source, bytes):
        data, name = source, "<bytes>"
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"image {path}: no such file")
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise ImageError(f"image {path}: {path.stat().st_size} bytes, over the {MAX_IMAGE_BYTES}-byte limit")
        data, name = path.read_bytes(), str(path)
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"image {name}: {len(data)} bytes, over the {MAX_IMAGE_BYTES}-byte limit")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"image {name}: {width}x{height} pixels, over the limit of {max_pixels}")
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"image {name}: not a readable image ({err})") from err
    except Image.DecompressionBombError as err:
        raise ImageError(f"image {name}: too large to decode ({err})") from err
    return image.convert("RGB")


def png_bytes(image: Image.Image) -> bytes:
    """The image encoded as PNG (what a device sends in OPEN)."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
