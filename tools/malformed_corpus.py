"""Generate a corpus of malformed and unusual image files for robustness tests (and your own checks).

python tools/malformed_corpus.py --out artifacts/corpus      # writes the files + expected.json

Each file comes with what a correct loader must do: "ok" (decodes; animations/multi-page give the first
frame; modes convert) or "refuse" with a word the one-line error must contain. Everything is generated
here from a fixed seed; nothing is downloaded. The bombs are built chunk by chunk, so making a file that
declares 20k x 20k costs a few MB, not the 400 MB its decoder would want.
"""

from __future__ import annotations

import argparse
import io
import json
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Case:
    name: str
    expect: str  # "ok" or "refuse"
    match: str = ""  # for "refuse": a fragment of the one-line error
    note: str = ""


def _photo(size: tuple[int, int] = (96, 64), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[:h, :w]
    a = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1).astype(np.float64)
    a += rng.normal(0, 8, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(w: int, h: int, bit_depth: int = 8, color: int = 0, idat: bytes | None = None) -> bytes:
    """A valid-looking PNG header for w x h; the pixel stream is whatever `idat` holds."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat or b"") + _chunk(b"IEND", b"")


def _zero_rows(w: int, h: int, bits: int) -> bytes:
    """zlib stream of h all-zero rows (filter byte + packed pixels), compressed row block by block."""
    row = b"\0" * (1 + (w * bits + 7) // 8)
    z, out, block = zlib.compressobj(9), [], 512
    for start in range(0, h, block):
        out.append(z.compress(row * min(block, h - start)))
    out.append(z.flush())
    return b"".join(out)


def _exif_rotated() -> bytes:
    im = _photo((80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display: the upright image is 40 x 80
    return _save(im, "JPEG", exif=exif.tobytes(), quality=90)


def _bad_exif() -> bytes:
    good = _save(_photo(), "JPEG")
    app1 = b"Exif\0\0" + b"II*\0" + b"\xff" * 40  # TIFF header whose IFD offset points nowhere
    return good[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + good[2:]


def _animated_gif() -> bytes:
    frames = [_photo((48, 48), s).convert("P") for s in range(4)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)


def _multipage_tiff() -> bytes:
    pages = [_photo((40, 30), s) for s in range(3)]
    return _save(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def _png16() -> bytes:
    a = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    return _save(Image.fromarray(a), "PNG")  # uint16 -> mode I;16


def _palette_transparent() -> bytes:
    im = _photo((50, 50)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _save(im, "PNG", transparency=0)


def _la() -> bytes:
    g = _photo((40, 40)).convert("L")
    return _save(Image.merge("LA", [g, Image.new("L", g.size, 128)]), "PNG")


def _rgba() -> bytes:
    im = _photo((40, 40)).convert("RGBA")
    im.putalpha(Image.linear_gradient("L").resize((40, 40)))
    return _save(im, "PNG")


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "a zip archive renamed to .jpg")
    return buf.getvalue()


SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'
HTML = b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"
BUILDERS: list[tuple[Case, Callable[[], bytes]]] = [
    (Case("zero_bytes.jpg", "refuse", "empty"), lambda: b""),
    (Case("text.jpg", "refuse", "not a supported image"), lambda: b"just some text, not pixels\n" * 4),
    (Case("html.jpg", "refuse", "not a supported image"), lambda: HTML),
    (Case("svg.jpg", "refuse", "not a supported image", "vector formats are not decoded"), lambda: SVG),
    (Case("zip.jpg", "refuse", "not a supported image"), _zip),
    (Case("pdf.png", "refuse", "not a supported image"), lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n"),
    (
        Case("pcx.png", "refuse", "not a supported image", "a real image in a format off the allow-list"),
        lambda: _save(_photo(), "PCX"),
    ),
    (Case("truncated.jpg", "refuse", "truncated"), lambda: (d := _save(_photo((200, 150)), "JPEG"))[: len(d) // 2]),
    (Case("truncated.png", "refuse", "truncated"), lambda: (d := _save(_photo((200, 150)), "PNG"))[: len(d) // 2]),
    (Case("header_only.png", "refuse", "truncated"), lambda: png_declaring(64, 64, idat=b"")),
    (
        Case("bomb_20k.png", "refuse", "MP", "1-bit 20000x20000, 400 MP"),
        lambda: png_declaring(20000, 20000, 1, 0, _zero_rows(20000, 20000, 1)),
    ),
    (
        Case("declares_13k.png", "refuse", "MP", "~20 KB file declaring 13000x13000 RGB"),
        lambda: png_declaring(13000, 13000, 8, 2, np.random.default_rng(0).bytes(20_000)),
    ),
    (Case("zero_width.gif", "refuse", "", "GIF screen of 0x0"), lambda: b"GIF89a\0\0\0\0\0\0\0;"),
    (Case("strip_60000x1.png", "refuse", "aspect"), lambda: png_declaring(60000, 1, 8, 0, _zero_rows(60000, 1, 8))),
    (Case("one_by_one.png", "ok"), lambda: _save(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG")),
    (Case("tall_40x1000.png", "ok", note="aspect 25:1, under the 50:1 cap"), lambda: _save(_photo((40, 1000)), "PNG")),
    (Case("animated.gif", "ok", note="first frame"), _animated_gif),
    (Case("multipage.tif", "ok", note="first page"), _multipage_tiff),
    (Case("cmyk.jpg", "ok"), lambda: _save(_photo().convert("CMYK"), "JPEG")),
    (Case("png16.png", "ok", note="16-bit gray, scaled not clipped"), _png16),
    (Case("exif_rotated.jpg", "ok", note="EXIF orientation 6"), _exif_rotated),
    (Case("bad_exif.jpg", "ok", note="malformed EXIF block is ignored"), _bad_exif),
    (Case("palette_transparent.png", "ok"), _palette_transparent),
    (Case("la.png", "ok"), _la),
    (Case("rgba.png", "ok"), _rgba),
    (Case("onebit.png", "ok"), lambda: _save(_photo().convert("1"), "PNG")),
    (Case("gray.jpg", "ok"), lambda: _save(_photo().convert("L"), "JPEG")),
    (Case("progressive.jpg", "ok"), lambda: _save(_photo((120, 90)), "JPEG", progressive=True)),
    (Case("image.webp", "ok"), lambda: _save(_photo(), "WEBP")),
    (Case("image.bmp", "ok"), lambda: _save(_photo(), "BMP")),
    (Case("png_named.jpg", "ok", note="content decides, not the extension"), lambda: _save(_photo(), "PNG")),
    (
        Case("trailing_junk.jpg", "ok", note="bytes after the JPEG end marker"),
        lambda: _save(_photo(), "JPEG") + b"\0junk" * 50,
    ),
    (
        Case("oversized_25mb.png", "refuse", "over the", "over the 20 MB file cap"),
        lambda: _save(_photo((8, 8)), "PNG") + b"\0" * (25 * 2**20),
    ),
]


def build(out: str | Path, include_oversized: bool = True) -> list[tuple[Case, Path]]:
    """Write every case into `out` (and expected.json); returns (case, path) pairs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for case, make in BUILDERS:
        if case.name.startswith("oversized") and not include_oversized:
            continue
        path = out / case.name
        path.write_bytes(make())
        written.append((case, path))
    manifest = [{**asdict(c), "bytes": p.stat().st_size} for c, p in written]
    (out / "expected.json").write_text(json.dumps(manifest, indent=2))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write malformed/unusual image files and their expected outcome.")
    p.add_argument("--out", type=Path, default=Path("artifacts/corpus"))
    p.add_argument("--no-oversized", action="store_true", help="skip the 25 MB file")
    args = p.parse_args(argv)
    files = build(args.out, not args.no_oversized)
    for case, path in files:
        print(f"{case.expect:6s} {path.stat().st_size:>10,d} B  {case.name}  {case.note}")
    print(f"wrote {len(files)} files + expected.json to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
