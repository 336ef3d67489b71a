import io
import time

import numpy as np
import pytest
from PIL import Image

from core.errors import UserError
from core.images import ImageError, load_image
from core.spec import ModelSpec


def spec(**kw) -> ModelSpec:
    base = {"image_size": 32, "resize_size": 36, "mean": (0.5,) * 3, "std": (0.5,) * 3}
    return ModelSpec("cnn_small", ("a", "b"), **{**base, **kw})


def test_spec_json_round_trip():
    s = spec(image_size=32, resize_size=36, color="gray", mean=(0.5,), std=(0.25,), arch_kwargs={"head": "mlp"})
    assert ModelSpec.from_json(s.to_json()) == s
    assert s.in_channels == 1 and s.num_classes == 2


@pytest.mark.parametrize(
    "bad",
    [
        dict(crop="zoom"),
        dict(color="rgb", mean=(0.5,), std=(0.5,)),
        dict(std=(0, 1, 1)),
        dict(image_size=300, resize_size=256),
    ],
)
def test_spec_rejects_invalid(bad):
    with pytest.raises(UserError, match="invalid model spec"):
        spec(**bad)


def test_spec_rejects_duplicate_classes_and_garbage_json():
    with pytest.raises(UserError):
        ModelSpec("x", ("a", "a"), image_size=8, resize_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(UserError, match="not valid JSON"):
        ModelSpec.from_json("{nope")


def save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_rgba_composited_on_white_not_black():
    im = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    out = load_image(save(im, "PNG"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency_and_la():
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0] * 256)
    assert load_image(save(p, "PNG", transparency=0)).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 0))
    assert load_image(save(la, "PNG")).mode == "L" and load_image(save(la, "PNG")).getpixel((0, 0)) == 255


def test_16bit_scaled_not_clipped():
    a = np.full((4, 4), 32768, np.uint16)
    out = load_image(save(Image.fromarray(a), "PNG"))
    assert out.mode == "L" and abs(out.getpixel((0, 0)) - 128) <= 1  # clipping would give 255


def test_cmyk_and_1bit():
    assert load_image(save(Image.new("CMYK", (4, 4), (0, 0, 0, 0)), "JPEG")).mode == "RGB"
    assert load_image(save(Image.new("1", (4, 4), 1), "PNG")).getpixel((0, 0)) == 255


def test_exif_orientation_applied():
    im = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    assert load_image(save(im, "JPEG", exif=exif)).size == (10, 20)


def test_first_frame_of_animation():
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = save(frames[0], "GIF", save_all=True, append_images=frames[1:])
    r, _, b = load_image(data).getpixel((0, 0))
    assert r > 200 and b < 50


def bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG whose header declares w x h: refused before any pixel buffer exists."""
    import struct
    import zlib

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"<html>hello</html>", "not a supported image"),
        (bomb_png(13000, 13000), "MP"),
        (bomb_png(60000, 1), "aspect"),
    ],
)
def test_hostile_inputs_get_one_line_errors(data, match):
    t = time.perf_counter()
    with pytest.raises(ImageError, match=match) as e:
        load_image(data)
    assert "\n" not in str(e.value) and time.perf_counter() - t < 1.0


def test_truncated_image_is_an_error(tmp_path):
    data = save(Image.new("RGB", (64, 64), (9, 9, 9)), "PNG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(data[: len(data) // 2])
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 10)
    with pytest.raises(ImageError):
        load_image(big)
