"""Images are refused with errors that name the file and the reason; one pixel limit for device and edge."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from covspec.errors import ImageError
from covspec.images import MAX_IMAGE_PIXELS, load_image, png_bytes


def test_errors_name_the_file_not_a_buffer(tmp_path: Path) -> None:
    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    cases = {tmp_path: "is a folder", tmp_path / "missing.png": "no such file", junk: "not a readable image"}
    for path, words in cases.items():
        with pytest.raises(ImageError) as err:
            load_image(path)
        assert str(path) in str(err.value) and words in str(err.value)
        assert "BytesIO" not in str(err.value)
    with pytest.raises(ImageError) as err:
        load_image(b"junk", name="upload.png")
    assert "upload.png" in str(err.value) and "BytesIO" not in str(err.value)


def test_pixel_limit_is_the_edges_default(tmp_path: Path) -> None:
    from covspec.edge_runtime.settings import EdgeSettings

    assert EdgeSettings().max_image_pixels == MAX_IMAGE_PIXELS
    big = tmp_path / "big.png"
    Image.new("RGB", (2049, 2048)).save(big)
    with pytest.raises(ImageError) as err:
        load_image(big)
    assert "2049x2048" in str(err.value) and str(MAX_IMAGE_PIXELS) in str(err.value)
    assert load_image(png_bytes(Image.new("RGB", (2048, 2048)))).size == (2048, 2048)
