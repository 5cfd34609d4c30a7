"""encoders.photo: safe decoding of untrusted photos."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from encoders.photo import PhotoLimits, check_photo, load_photo
from vault.errors import InvalidInput, PhotoRejected


def _encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt, **kwargs)
    return buf.getvalue()


def _gradient(h: int = 48, w: int = 64) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return np.stack([xs * 4 % 256, ys * 5 % 256, (xs + ys) * 2 % 256], axis=2).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but holds no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt, exact", [("PNG", True), ("JPEG", False), ("WEBP", False)])
def test_decodes_allowed_formats_to_rgb_uint8(fmt: str, exact: bool) -> None:
    original = _gradient()
    data = _encode(original, fmt, **({"quality": 95} if not exact else {}))
    decoded = load_photo(data)
    assert decoded.shape == (48, 64, 3) and decoded.dtype == np.uint8
    if exact:
        np.testing.assert_array_equal(decoded, original)
    else:
        assert np.abs(decoded.astype(int) - original).mean() < 8


def test_reads_a_path_and_names_it_in_errors(tmp_path: Path) -> None:
    good = tmp_path / "selfie.png"
    good.write_bytes(_encode(_gradient(), "PNG"))
    assert load_photo(good).shape == (48, 64, 3)
    assert load_photo(str(good)).shape == (48, 64, 3)
    bad = tmp_path / "holiday.png"
    bad.write_bytes(b"this is not a picture")
    with pytest.raises(PhotoRejected) as err:
        load_photo(bad)
    assert "holiday.png" in str(err.value) and str(tmp_path) not in str(err.value)


def test_exif_orientation_is_applied() -> None:
    # 80 wide x 40 high: left half red, right half blue; EXIF 6 = rotate 90 clockwise.
    array = np.zeros((40, 80, 3), np.uint8)
    array[:, :40] = (255, 0, 0)
    array[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = load_photo(_encode(array, "JPEG", quality=95, exif=exif))
    assert decoded.shape == (80, 40, 3)  # now portrait
    top, bottom = decoded[:35].reshape(-1, 3).mean(0), decoded[45:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60  # the red left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_pixels_are_pillows_own_decoding_upright(fmt: str, orientation: int) -> None:
    # load_photo skips Pillow's defensive copies (exif_transpose in place, no
    # convert of an RGB image); the pixels must stay those of the plain recipe.
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(_gradient(), fmt, exif=exif.tobytes())
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    got = load_photo(data)
    assert got.shape == ((48, 64, 3) if orientation in (1, 3) else (64, 48, 3))
    np.testing.assert_array_equal(got, want)
    assert got.flags.c_contiguous


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_rejected(fmt: str) -> None:
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)  # incompressible
    data = _encode(noisy, fmt)
    with pytest.raises(PhotoRejected) as err:
        load_photo(data[: len(data) // 2], name="cut.img")
    message = str(err.value)
    assert message.startswith("cut.img:") and ("truncated" in message or "corrupt" in message)


def test_non_image_is_rejected() -> None:
    with pytest.raises(PhotoRejected, match="not a readable image"):
        load_photo(b"%!PS-Adobe-3.0 definitely not a photo" * 10, name="doc")


def test_unsupported_format_is_named() -> None:
    gif = _encode(_gradient(), "GIF")
    with pytest.raises(PhotoRejected, match="GIF is not supported; use JPEG, PNG or WebP"):
        load_photo(gif)
    bmp = _encode(_gradient(), "BMP")
    with pytest.raises(PhotoRejected, match="BMP is not supported"):
        load_photo(bmp)


def test_decompression_bomb_is_refused_from_the_header() -> None:
    # 10 gigapixels declared in 50 bytes: PIL's own bomb check fires at open.
    bomb = _png_header_only(100_000, 100_000)
    with pytest.raises(PhotoRejected, match="decompression bomb"):
        load_photo(bomb, name="bomb.png")


def test_pixel_limit_is_checked_before_decoding() -> None:
    # 48 MP declared, no pixel data at all: had anything been decoded the
    # error would be about truncation, not size.
    with pytest.raises(PhotoRejected) as err:
        load_photo(_png_header_only(8000, 6000), name="big.png")
    assert "8000x6000 is 48.0 megapixels, over the limit of 40.0" in str(err.value)
    # The limit is configurable.
    small = _encode(_gradient(), "PNG")
    with pytest.raises(PhotoRejected, match="megapixels"):
        load_photo(small, PhotoLimits(max_pixels=1000))


def test_oversized_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    huge = tmp_path / "huge.jpg"
    with huge.open("wb") as handle:  # sparse: 25 MB on paper, nothing written
        handle.truncate(25 * 1024 * 1024)
    expected = r"huge.jpg: the file is 25.0 MB, over the limit of 20.0 MB"
    with pytest.raises(PhotoRejected, match=expected):
        load_photo(huge)
    data = _encode(_gradient(), "PNG")
    with pytest.raises(PhotoRejected, match="over the limit"):
        load_photo(data, PhotoLimits(max_bytes=len(data) - 1))
    assert load_photo(data, PhotoLimits(max_bytes=len(data))).shape == (48, 64, 3)


def test_missing_empty_and_wrong_type_inputs(tmp_path: Path) -> None:
    with pytest.raises(PhotoRejected, match="nowhere.jpg: no such file"):
        load_photo(tmp_path / "nowhere.jpg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(PhotoRejected, match="empty.png: the file is empty"):
        load_photo(empty)
    with pytest.raises(PhotoRejected, match="not a regular file"):
        load_photo(tmp_path)
    with pytest.raises(InvalidInput):
        load_photo(12345)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        PhotoLimits(max_bytes=0)


def test_sixteen_bit_and_transparent_pngs_convert_sensibly() -> None:
    grey16 = (np.arange(64 * 32, dtype=np.uint32).reshape(32, 64) * 32).astype(np.uint16)
    decoded = load_photo(_encode(grey16, "PNG"))
    assert decoded.shape == (32, 64, 3)
    np.testing.assert_array_equal(decoded[:, :, 0], (grey16 >> 8).astype(np.uint8))
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:, :20] = (10, 20, 30, 255)  # opaque left half, transparent (black) right half
    decoded = load_photo(_encode(rgba, "PNG"))
    assert tuple(decoded[0, 0]) == (10, 20, 30)
    assert tuple(decoded[0, 39]) == (255, 255, 255)  # transparent shows as white


def test_damaged_header_of_an_allowed_format_says_so() -> None:
    data = _encode(_gradient(), "PNG")
    for cut in (12, 20, 30):
        with pytest.raises(PhotoRejected, match="corrupt or truncated PNG header"):
            load_photo(data[:cut])


# -- decodable but hostile: shapes and pixel formats no face detector can use ---------------


def _solid(width: int, height: int, mode: str = "RGB", fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("width, height, words", [
    (60000, 2, "60000x2 is 30000 times as wide as it is high; at most 10:1"),
    (2, 60000, "2x60000 is 30000 times as high as it is wide"),
    (321, 32, "321x32 is 10 times as wide"),  # just over 10:1 (10.03)
    (640, 60, "640x60 is 10.7 times as wide"),
])
def test_extreme_aspect_ratios_are_refused_naming_the_shape(width, height, words) -> None:
    with pytest.raises(PhotoRejected) as err:
        load_photo(_solid(width, height), name="strip.png")
    assert str(err.value).startswith("strip.png: ") and words in str(err.value)
    assert err.value.details["width"] == width and err.value.details["height"] == height


def test_the_shape_is_refused_from_the_header_before_decoding() -> None:
    # No pixel data at all: had anything been decoded the error would be truncation.
    for width, height, words in ((60000, 2, "times as wide"), (20, 20, "too small")):
        with pytest.raises(PhotoRejected, match=words):
            load_photo(_png_header_only(width, height))
        with pytest.raises(PhotoRejected, match=words):
            check_photo(_png_header_only(width, height))


@pytest.mark.parametrize("width, height", [(1, 1), (31, 31), (31, 200), (200, 31)])
def test_tiny_images_are_refused(width, height) -> None:
    with pytest.raises(PhotoRejected, match=rf"{width}x{height} is too small; a photo must be "
                                            r"at least 32 px on each side"):
        load_photo(_solid(width, height))


def test_the_bounds_themselves_are_accepted_and_configurable() -> None:
    assert load_photo(_solid(32, 32)).shape == (32, 32, 3)
    assert load_photo(_solid(320, 32)).shape == (32, 320, 3)  # exactly 10:1
    assert load_photo(_solid(20, 20), PhotoLimits(min_side=16)).shape == (20, 20, 3)
    assert load_photo(_solid(640, 32), PhotoLimits(max_aspect=20)).shape == (32, 640, 3)
    with pytest.raises(PhotoRejected, match="at most 2:1"):
        load_photo(_solid(100, 40), PhotoLimits(max_aspect=2))
    for bad in ({"min_side": 0}, {"max_aspect": 0.5}, {"max_aspect": float("nan")}):
        with pytest.raises(InvalidInput):
            PhotoLimits(**bad)


@pytest.mark.parametrize("mode, fmt, kwargs", [
    ("1", "PNG", {}), ("L", "PNG", {}), ("LA", "PNG", {}), ("I;16", "PNG", {}),
    ("P", "PNG", {}), ("P", "PNG", {"transparency": 0}), ("RGBA", "PNG", {}),
    ("CMYK", "JPEG", {}), ("L", "JPEG", {}), ("RGBA", "WEBP", {}),
])
def test_odd_pixel_formats_decode_to_rgb(mode, fmt, kwargs) -> None:
    decoded = load_photo(_solid(40, 50, mode, fmt, **kwargs))
    assert decoded.shape == (50, 40, 3) and decoded.dtype == np.uint8


def test_a_transparent_palette_colour_shows_as_white() -> None:
    image = Image.new("P", (40, 40), 1)
    image.putpalette([0, 0, 0, 200, 10, 10])
    image.paste(0, (0, 0, 20, 40))  # left half: palette entry 0, declared transparent
    buf = io.BytesIO()
    image.save(buf, "PNG", transparency=0)
    decoded = load_photo(buf.getvalue())
    assert tuple(decoded[0, 0]) == (255, 255, 255) and tuple(decoded[0, 39]) == (200, 10, 10)


def test_malformed_palettes_are_refused_or_harmless() -> None:
    raw = zlib.compress(b"".join(b"\x00" + bytes([200] * 40) for _ in range(40)))
    ihdr = struct.pack(">IIBBBBB", 40, 40, 8, 3, 0, 0, 0)  # 8-bit palette image

    def png(*chunks: bytes) -> bytes:
        return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + b"".join(chunks)
                + _png_chunk(b"IDAT", raw) + _png_chunk(b"IEND", b""))

    # A palette far beyond PNG's 256 entries: refused, naming the palette.
    with pytest.raises(PhotoRejected, match="palette"):
        load_photo(png(_png_chunk(b"PLTE", bytes(range(256)) * 300)), name="huge-palette.png")
    # Indexes past a one-colour palette, and a transparency table longer than the
    # palette: decoded (as viewers do), never a crash.
    short = load_photo(png(_png_chunk(b"PLTE", b"\x01\x02\x03")))
    assert short.shape == (40, 40, 3)
    padded = load_photo(png(_png_chunk(b"PLTE", b"\x01\x02\x03"),
                            _png_chunk(b"tRNS", b"\x00" * 256)))
    assert padded.shape == (40, 40, 3)


def test_a_pixel_format_outside_the_known_ones_is_refused_before_decoding(monkeypatch) -> None:
    import encoders.photo as photo

    monkeypatch.setattr(photo, "_KNOWN_MODES", photo._KNOWN_MODES - {"CMYK"})
    with pytest.raises(PhotoRejected, match="pixel format 'CMYK' is not supported") as err:
        load_photo(_solid(40, 40, "CMYK", "JPEG"))
    assert err.value.details["mode"] == "CMYK"


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animations_yield_their_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (40, 40), colour) for colour in
              ((250, 0, 0), (0, 0, 250), (0, 250, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=100,
                   loop=0, **({"lossless": True} if fmt == "WEBP" else {}))
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    decoded = load_photo(buf.getvalue())
    assert decoded.shape == (40, 40, 3) and tuple(decoded[20, 20]) == (250, 0, 0)
