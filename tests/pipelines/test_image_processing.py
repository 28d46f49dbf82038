"""The image processor: every kind of image a user may hand in, and bad input."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lavit_mlx.errors import ImageError
from support import png_header_only
from lavit_mlx.image_processing import CLIP_MEAN, CLIP_STD, load_image, load_images, preprocess


def rgb_at(image: Image.Image, xy=(0, 0)):
    return image.convert("RGB").getpixel(xy)


def test_rgb_roundtrip_and_normalisation(tmp_path):
    path = tmp_path / "white.png"
    Image.new("RGB", (50, 30), (255, 255, 255)).save(path)
    pixels = load_images([path])
    assert pixels.shape == (1, 3, 224, 224) and pixels.dtype == np.float32
    expected = (1.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(pixels[0, :, 100, 100], expected, rtol=1e-6)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_on_white(tmp_path, mode):
    image = Image.new(mode, (20, 20), (0, 0) if mode == "LA" else (0, 0, 0, 0))
    path = tmp_path / f"clear_{mode}.png"
    image.save(path)
    assert rgb_at(load_image(path)) == (255, 255, 255)


def test_half_transparent_red_on_white(tmp_path):
    path = tmp_path / "half.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 128)).save(path)
    r, g, b = rgb_at(load_image(path))
    assert r == 255 and 120 <= g <= 130 and g == b


def test_palette_with_transparency(tmp_path):
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    image.info["transparency"] = 0
    path = tmp_path / "p.png"
    image.save(path, transparency=0)
    assert rgb_at(load_image(path)) == (255, 255, 255)


def test_greyscale_and_cmyk(tmp_path):
    grey = tmp_path / "grey.png"
    Image.new("L", (10, 10), 77).save(grey)
    assert rgb_at(load_image(grey)) == (77, 77, 77)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk, quality=100)
    r, g, b = rgb_at(load_image(cmyk), (8, 8))
    assert r > 240 and g < 20 and b < 20  # pure red


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 128 * 257, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    assert rgb_at(load_image(path)) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 30, 40))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    image.save(path, exif=exif, quality=100)
    upright = load_image(path)
    assert upright.size == (40, 60)
    r, _, b = rgb_at(upright, (20, 5))  # the red half is now on top
    assert r > 200 and b < 60


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (12, 12), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    r, _, b = rgb_at(load_image(path))
    assert r > 200 and b < 50


def test_batch_of_mixed_images(tmp_path):
    paths = []
    for i, (mode, size) in enumerate([("RGB", (300, 200)), ("L", (64, 64)), ("RGBA", (17, 500))]):
        path = tmp_path / f"{i}.png"
        Image.new(mode, size).save(path)
        paths.append(path)
    assert load_images(paths).shape == (3, 3, 224, 224)


def test_pil_images_are_accepted():
    batch = preprocess([load_image(Image.new("RGBA", (30, 30)))])
    assert batch.shape == (1, 3, 224, 224)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "name,content,message",
    [
        ("empty.png", b"", "empty"),
        ("notes.jpg", b"this is a text file, not a photo\n" * 20, "not an image"),
        ("huge.png", png_header_only(30000, 30000), "too large"),
    ],
)
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_truncated_image(tmp_path):
    full = tmp_path / "full.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(cut)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nothing.png")
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)
