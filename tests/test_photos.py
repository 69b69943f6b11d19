"""Photos as people take them: 12-megapixel phone JPEGs decoded at the size the model uses, EXIF
orientation with that, very large PNGs in bounded memory, and image paths as people keep them (nested
folders, absolute paths, any format Pillow reads). Every photo is generated here."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_data_or_skip
from PIL import Image, ImageDraw, ImageOps

from fuselabel.encoding import read_photos
from fuselabel.images import decode_box, eval_pixels, load_rgb, open_image, resolve_image
from fuselabel.inspection import find_missing_images, find_unreadable_images

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _config(size: int, crop_pct: float = 1.0) -> dict:
    return {"input_size": (3, size, size), "crop_pct": crop_pct, "interpolation": "bicubic", "mean": MEAN, "std": STD}


def _scene(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like picture: smooth shading, shapes with edges, some grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [120 + 80 * np.sin(x / width * 6), 100 + 90 * (y / height), 140 + 60 * np.cos((x + y) / width * 4)], -1
    )
    img = Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(width // 20, width // 6))
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


def _jpeg(img: Image.Image, path=None, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    if path is not None:
        path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _as_before(source) -> Image.Image:
    """How photos were decoded before decoding took a target: every pixel, then the EXIF turn."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        img.draft("RGB", img.size)
        img.load()
        return ImageOps.exif_transpose(img).convert("RGB")


@pytest.fixture(scope="module")
def phone_photo():
    """A course-sized scene blown up to a 12-megapixel phone JPEG (4032 x 3024, quality 90)."""
    return _jpeg(_scene(640, 480).resize((4032, 3024), Image.BICUBIC))


@pytest.mark.parametrize("size, crop_pct, scale", [(224, 1.0, 4), (320, 1.0, 4), (384, 0.875, 2)])
def test_large_jpeg_decodes_at_draft_size_with_nearly_the_same_pixels(phone_photo, size, crop_pct, scale):
    cfg = _config(size, crop_pct)
    small = load_rgb(phone_photo, size=cfg)
    full = load_rgb(phone_photo)
    assert full.size == (4032, 3024)
    # The smallest DCT scale that keeps twice the needed side (384 px at crop 0.875: the short side is
    # resized to 439, so 1/4 would be too small): 1/16 or 1/4 of the pixels.
    assert small.size == (4032 // scale, 3024 // scale) and min(small.size) >= 2 * decode_box(cfg)[0]
    assert min(small.size) // 2 < 2 * decode_box(cfg)[0]  # and the next scale would not
    a, b = eval_pixels(small, cfg), eval_pixels(full, cfg)
    assert a.shape == b.shape == (3, size, size)
    # In 0-255 units: the two differ by well under one grey level on average.
    diff = np.abs(a - b) * 0.5 * 255
    assert diff.mean() < 1.0 and np.percentile(diff, 99) < 6, (diff.mean(), np.percentile(diff, 99))


def test_read_photos_decodes_at_the_encoders_size(phone_photo, tmp_path):
    cfg = _config(320)
    (tmp_path / "phone.jpg").write_bytes(phone_photo)
    pixels, errors = read_photos(["phone.jpg", phone_photo], tmp_path, cfg, workers=1)
    assert errors == [None, None]
    expected = eval_pixels(load_rgb(phone_photo, size=cfg), cfg)
    np.testing.assert_array_equal(pixels[0], expected)
    np.testing.assert_array_equal(pixels[1], expected)


def test_rotated_large_jpeg_comes_out_upright(tmp_path):
    # Stored landscape, red left half and blue right half; orientation 6: shown turned 90 degrees clockwise,
    # so upright it is portrait with red on top.
    stored = np.zeros((3024, 4032, 3), np.uint8)
    stored[:, :2016] = (220, 30, 30)
    stored[:, 2016:] = (30, 30, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _jpeg(Image.fromarray(stored), exif=exif.tobytes())
    img = load_rgb(data, size=320)
    assert img.size == (756, 1008)  # 1/4 of each side, turned
    top, bottom = np.asarray(img)[100, 378], np.asarray(img)[900, 378]
    assert top[0] > 180 and top[2] < 80 and bottom[2] > 180 and bottom[0] < 80
    assert _as_before(data).size == (3024, 4032)
    # A wide box for the upright photo needs its width from the stored height: the box must be turned
    # before the DCT scale is chosen (unturned, 1/2 scale would leave the upright width at 1512 < 2000).
    wide = load_rgb(data, size=(1000, 100))
    assert wide.width >= 2000 and wide.height >= 200
    assert wide.size == (3024, 4032)


@pytest.mark.parametrize(
    "width, height, orientation", [(320, 240, 1), (640, 480, 1), (213, 320, 1), (640, 480, 6), (1200, 900, 8)]
)
def test_course_sized_photos_are_byte_identical(tmp_path, width, height, orientation):
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    path = tmp_path / "p.jpg"
    _jpeg(_scene(width, height, seed=width), path, exif=exif.tobytes())
    before = np.asarray(_as_before(path))
    for cfg in (_config(224), _config(260, 0.875), _config(320), _config(384)):
        if max(width, height) >= 4 * decode_box(cfg)[0]:
            continue  # large enough to be reduced: not a course-sized photo for this encoder
        np.testing.assert_array_equal(np.asarray(load_rgb(path, size=cfg)), before)
        np.testing.assert_array_equal(eval_pixels(load_rgb(path, size=cfg), cfg), eval_pixels(_as_before(path), cfg))


def test_real_course_photos_unchanged():
    data = shared_data_or_skip("course photos decode as before")
    photos = sorted((data / "data").glob("*.jpg"))[:40]
    for cfg in (_config(224), _config(320)):
        pixels, errors = read_photos(photos, None, cfg, workers=1)
        assert errors == [None] * len(photos)
        for path, got in zip(photos, pixels):
            np.testing.assert_array_equal(got, eval_pixels(_as_before(path), cfg))


def test_large_png_and_webp_are_reduced_before_conversion():
    rgba = _scene(2400, 1800).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((2400, 1800)))
    for fmt in ("PNG", "WEBP"):
        buf = io.BytesIO()
        rgba.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        small, full = load_rgb(buf.getvalue(), size=224), load_rgb(buf.getvalue())
        assert small.size == (600, 450) and full.size == (2400, 1800)  # reduced by 4: still >= 2 x 224
        cfg = _config(224)
        diff = np.abs(eval_pixels(small, cfg) - eval_pixels(full, cfg)) * 0.5 * 255
        assert diff.mean() < 1.0, (fmt, diff.mean())


def test_image_paths_as_people_keep_them(tmp_path):
    root = tmp_path / "photos"
    scene = _scene(64, 48)
    files = {
        "shoes/red/1.webp": "WEBP",
        "shoes/blue/2.png": "PNG",
        "bags/3.jpeg": "JPEG",
        "4.JPG": "JPEG",
        "odd/5.jpg": "PNG",
        "tiffs/6.tif": "TIFF",
    }  # the format is read from the contents
    for rel, fmt in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        scene.save(root / rel, fmt)
    absolute = str(root / "shoes/blue/2.png")
    ids = [*files, absolute]
    assert resolve_image("shoes/red/1.webp", root) == root / "shoes/red/1.webp"
    assert resolve_image(absolute, root) == root / "shoes/blue/2.png"
    assert resolve_image("x.jpg", None).as_posix() == "x.jpg"
    for item in ids:
        img, err = open_image(item, root)
        assert err is None and img.size == (64, 48), (item, err)
    pixels, errors = read_photos(ids, root, _config(32), workers=1)
    assert errors == [None] * len(ids) and all(p.shape == (3, 32, 32) for p in pixels)
    (root / "broken").mkdir()
    (root / "broken/7.jpg").write_bytes(b"not a photo")
    more = [*ids, "broken/7.jpg", "shoes/green/8.webp", str(root / "gone.png")]
    assert find_missing_images(more, root) == ["shoes/green/8.webp", str(root / "gone.png")]
    unreadable = find_unreadable_images(more, root)
    assert [i for i, _ in unreadable] == ["broken/7.jpg"]
    img, err = open_image("shoes/green/8.webp", root)
    assert img is None and "missing" in err and "shoes/green/8.webp" in err


_PEAK = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from fuselabel.images import eval_pixels, load_rgb

    def high_water_mb():
        # VmHWM belongs to this program's memory alone (ru_maxrss would start at the forking parent's).
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024

    data = Path(sys.argv[1]).read_bytes()
    cfg = {"input_size": (3, 320, 320), "crop_pct": 1.0, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    before = high_water_mb()
    img = load_rgb(data, size=cfg if sys.argv[2] == "target" else None)
    eval_pixels(img, cfg)
    print(json.dumps({"mb": high_water_mb() - before, "size": img.size}))
""")


def _peak_mb(path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path), mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from /proc (Linux)")
def test_huge_png_is_decoded_in_bounded_memory(tmp_path):
    # 8000 x 8000 RGBA (transparent corners, as exported graphics often are): 256 MB once decoded.
    img = Image.new("RGBA", (8000, 8000), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.ellipse((200, 200, 7800, 7800), fill=(200, 60, 60, 255))
    draw.rectangle((3000, 1000, 5000, 7000), fill=(40, 90, 200, 255))
    path = tmp_path / "poster.png"
    img.save(path, compress_level=1)
    del img, draw
    bounded, everything = _peak_mb(path, "target"), _peak_mb(path, "full")
    decoded_mb = 8000 * 8000 * 4 / 2**20
    assert bounded["size"] == [667, 667] and everything["size"] == [8000, 8000]
    # Bounded: the decoded PNG once plus its reduced copy. Every pixel, then turned and laid on white:
    # several full-size copies.
    assert bounded["mb"] < 1.25 * decoded_mb, (bounded, everything)
    assert bounded["mb"] < 0.5 * everything["mb"], (bounded, everything)


@pytest.mark.parametrize("mode", ["RGBA", "P", "L"])
def test_reduction_in_bands_equals_reducing_the_whole_photo(mode):
    src = _scene(1999, 1537).convert("RGBA")
    src.putalpha(Image.linear_gradient("L").resize(src.size))
    img = src.convert(mode)
    if mode == "P":
        img.info["transparency"] = 3
    got = load_rgb(img, size=(166, 128))  # a factor of 6, over several bands of rows

    def on_white(im):  # as load_rgb shows transparency
        return Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))

    # Image.reduce takes no palette: such a photo is laid on white first, RGBA after reducing.
    reduced = on_white(img).reduce(6) if mode == "P" else img.reduce(6)
    if reduced.mode == "RGBA":
        reduced = on_white(reduced)
    assert got.size == (334, 257)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(reduced.convert("RGB")))
