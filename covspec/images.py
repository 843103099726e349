"""Reading images from disk with clear errors and a size bound."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from covspec.errors import ImageError

# bound on decoded size, shared by the device and the edge (its default --max-image-pixels): an image the
# device accepts is never refused by the edge; larger images are refused, not resized
MAX_IMAGE_PIXELS = 2048 * 2048
MAX_IMAGE_BYTES = 32 * 1024 * 1024


def load_image(source: str | Path | bytes, max_pixels: int = MAX_IMAGE_PIXELS, name: str | None = None) -> Image.Image:
    """Opens an image file (or encoded bytes, called `name` in errors) as RGB, refusing unreadable or
    oversized input with an ImageError that names the file."""
    if isinstance(source, bytes):
        data, name = source, name or "<bytes>"
    else:
        path = Path(source)
        if path.is_dir():
            raise ImageError(f"image {path}: is a folder, not an image file (pass a PNG or JPEG file)")
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
    except UnidentifiedImageError:
        raise ImageError(f"image {name}: not a readable image (not a format Pillow reads: PNG, JPEG, ...)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"image {name}: not a readable image ({err})") from None
    except Image.DecompressionBombError as err:
        raise ImageError(f"image {name}: too large to decode ({err})") from err
    return image.convert("RGB")


def png_bytes(image: Image.Image) -> bytes:
    """The image encoded as PNG (what a device sends in OPEN)."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
