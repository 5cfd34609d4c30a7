"""Safe photo decoding: untrusted bytes in, an RGB pixel array out.

Photos arrive from uploads and from the CLI, so every step assumes hostile
input. The file size is checked before the bytes are read, the pixel count is
read from the header and checked before anything is decoded (a 100 kB PNG can
declare 10 gigapixels), only the JPEG, PNG and WebP decoders are ever run, and
every failure becomes a :class:`~vault.errors.PhotoRejected` that names the
file and says what is wrong with it. The header is also checked for shapes
no face detector can use (a side under ``min_side`` pixels, a side more than
``max_aspect`` times the other: a 60000x2 PNG would otherwise scale to zero
rows in the detector) and for pixel formats outside the ones these decoders
produce, all before any pixel is decoded. An animated PNG or WebP yields its
first frame; the others are never decoded. EXIF orientation is applied so that
what the face detector sees is what the user's photo viewer shows.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vault.errors import InvalidInput, PhotoRejected

# PIL format names of the only decoders we run. Multi-picture JPEGs from
# phones and cameras open through the JPEG decoder and report format "MPO".
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")

# Pixel formats (PIL modes) the allowed decoders produce, by what they hold: anything
# else is refused from the header, before its decoder or a conversion runs.
_KNOWN_MODES = frozenset({
    "1", "L", "P", "RGB",  # bilevel, grey, palette, colour
    "LA", "La", "PA", "RGBA", "RGBa", "RGBX",  # the same with alpha or padding
    "CMYK", "YCbCr",  # print and camera JPEGs
    "I", "I;16", "I;16B", "I;16L", "I;16N",  # 16-bit grey PNGs
})

# Magic numbers of formats people commonly try, so a refusal can say what the
# file is instead of "not an image" -- without running those formats' parsers.
_KNOWN_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypheix", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"),
    (b"ftypavif", 4, "AVIF"),
    (b"%PDF", 0, "PDF"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"8BPS", 0, "PSD"),
)
# Signatures of the allowed formats: a file that starts like one but that PIL
# cannot identify is damaged, not of the wrong kind.
_ALLOWED_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"WEBP", 8, "WebP"),
)


@dataclass(frozen=True)
class PhotoLimits:
    """What a photo may cost to decode.

    ``max_bytes`` bounds the encoded file (default 20 MB, larger than any
    phone photo); ``max_pixels`` bounds width x height as declared in the
    header (default 40 MP: a 48 MP phone sensor is usually saved at 12 MP, and
    a decoded 40 MP RGB image is 120 MB). Pillow's own bomb guard
    (``Image.MAX_IMAGE_PIXELS``, 89 MP) refuses larger images at open even if
    ``max_pixels`` is raised past it.

    ``min_side`` is the shortest side accepted (default 32 px: a face must be
    64 px across to be used, so a smaller photo can never enroll), and
    ``max_aspect`` the most one side may exceed the other (default 10: phone
    panoramas reach about 8:1; at 10:1 the detector, which scales the longer
    side to 640 px, still sees 64 px across the shorter).
    """

    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    min_side: int = 32
    max_aspect: float = 10.0

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0 or self.min_side <= 0:
            raise InvalidInput("photo limits must be positive")
        if not self.max_aspect >= 1.0:
            raise InvalidInput("max_aspect must be at least 1 (a square)")


def load_photo(
    source: bytes | bytearray | str | Path,
    limits: PhotoLimits = PhotoLimits(),
    *,
    name: str | None = None,
) -> np.ndarray:
    """Decode a photo into an (H, W, 3) uint8 RGB array, upright.

    ``source`` is the encoded bytes or a path. ``name`` is what error
    messages call the photo (default: the file's name, or "photo" for bytes);
    only the base name of a path is used so server paths do not leak into
    messages shown to users.
    """
    label, image = _checked_header(source, limits, name)
    image = _decode(image, label)
    return _to_rgb_array(image, label)


def check_photo(
    source: bytes | bytearray | str | Path,
    limits: PhotoLimits = PhotoLimits(),
    *,
    name: str | None = None,
) -> None:
    """Refuse, as :func:`load_photo` would, a photo that cannot be read, is not an image
    or is too large -- from its header, without decoding the pixels (a cheap check that
    commands make before any model loads)."""
    _checked_header(source, limits, name)


# -- steps ---------------------------------------------------------------------


def _checked_header(source, limits: PhotoLimits, name: str | None):
    """The photo's label and its opened (not yet decoded) image, size limits checked."""
    label, data = _read_source(source, limits, name)
    image = _open_header(data, label)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise PhotoRejected(f"{label}: the image has no pixels ({width}x{height})", photo=label)
    if width * height > limits.max_pixels:
        raise PhotoRejected(
            f"{label}: {width}x{height} is {width * height / 1e6:.1f} megapixels, over the "
            f"limit of {limits.max_pixels / 1e6:.1f}; scale the photo down and try again",
            photo=label,
            width=width,
            height=height,
        )
    longer, shorter = max(width, height), min(width, height)
    if longer > shorter * limits.max_aspect:
        ratio = f"{longer / shorter:.1f}".removesuffix(".0")
        raise PhotoRejected(
            f"{label}: {width}x{height} is {ratio} times as "
            f"{'wide as it is high' if width > height else 'high as it is wide'}; at most "
            f"{limits.max_aspect:g}:1 is accepted, so crop the photo around the face",
            photo=label,
            width=width,
            height=height,
        )
    if shorter < limits.min_side:
        raise PhotoRejected(
            f"{label}: {width}x{height} is too small; a photo must be at least "
            f"{limits.min_side} px on each side (a face needs about 64 px)",
            photo=label,
            width=width,
            height=height,
        )
    if image.mode not in _KNOWN_MODES:
        raise PhotoRejected(
            f"{label}: the {image.format or 'image'} pixel format {image.mode!r} is not "
            f"supported; save the photo as ordinary 8-bit RGB",
            photo=label,
            mode=image.mode,
        )
    return label, image


def _read_source(
    source: bytes | bytearray | str | Path, limits: PhotoLimits, name: str | None
) -> tuple[str, bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        label = name or "photo"
        data = bytes(source)
        if len(data) > limits.max_bytes:
            raise _too_big(label, len(data), limits)
        return label, data
    if not isinstance(source, (str, os.PathLike)):
        raise InvalidInput(f"a photo must be bytes or a path, not {type(source).__name__}")
    path = Path(source)
    label = name or path.name or str(path)
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise PhotoRejected(f"{label}: not a regular file", photo=label)
        # Stat first so a huge file is refused without reading it; then read at
        # most one byte past the limit in case the file grows in between.
        if size > limits.max_bytes:
            raise _too_big(label, size, limits)
        with path.open("rb") as handle:
            data = handle.read(limits.max_bytes + 1)
    except FileNotFoundError:
        raise PhotoRejected(f"{label}: no such file", photo=label) from None
    except PermissionError:
        raise PhotoRejected(f"{label}: permission denied", photo=label) from None
    except IsADirectoryError:
        raise PhotoRejected(f"{label}: not a regular file", photo=label) from None
    if len(data) > limits.max_bytes:
        raise _too_big(label, len(data), limits)
    return label, data


def _too_big(label: str, size: int, limits: PhotoLimits) -> PhotoRejected:
    mb = 1024 * 1024
    return PhotoRejected(
        f"{label}: the file is {size / mb:.1f} MB, "
        f"over the limit of {limits.max_bytes / mb:.1f} MB",
        photo=label,
        size=size,
    )


def _open_header(data: bytes, label: str) -> Image.Image:
    """Parse only the header, with only the allowed decoders."""
    if not data:
        raise PhotoRejected(f"{label}: the file is empty", photo=label)
    with warnings.catch_warnings():
        # PIL warns between MAX_IMAGE_PIXELS and twice that and raises above;
        # both mean "enormous" and we refuse either (our own limit is lower by
        # default, but a caller may raise it).
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise PhotoRejected(
                f"{label}: the image declares an enormous size and was refused "
                f"without decoding (possible decompression bomb): {exc}",
                photo=label,
            ) from None
        except UnidentifiedImageError:
            allowed = _sniff(data, _ALLOWED_SIGNATURES)
            if allowed is not None:
                raise PhotoRejected(
                    f"{label}: corrupt or truncated {allowed} header",
                    photo=label,
                ) from None
            other = _sniff(data, _KNOWN_SIGNATURES)
            if other is not None:
                raise PhotoRejected(
                    f"{label}: {other} is not supported; use JPEG, PNG or WebP",
                    photo=label,
                    format=other,
                ) from None
            raise PhotoRejected(
                f"{label}: not a readable image (expected JPEG, PNG or WebP)", photo=label
            ) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            # A recognised signature followed by a broken header.
            fmt = _sniff(data, _ALLOWED_SIGNATURES) or "image"
            raise PhotoRejected(
                f"{label}: corrupt or truncated {fmt} header ({exc})", photo=label
            ) from None


def _sniff(data: bytes, table: tuple[tuple[bytes, int, str], ...]) -> str | None:
    for signature, offset, fmt in table:
        if data[offset : offset + len(signature)] == signature:
            return fmt
    return None


def _decode(image: Image.Image, label: str) -> Image.Image:
    fmt = image.format or "image"
    try:
        # Decode the first frame only (animated WebP/APNG: the first one).
        image.load()
        # Applying EXIF orientation decodes nothing new, but malformed EXIF
        # blocks can raise here, so it stays inside the guard. In place: the
        # default returns a copy even when nothing turns (~40 ms for 12 MP).
        ImageOps.exif_transpose(image, in_place=True)
        return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PhotoRejected(
            f"{label}: refused as a possible decompression bomb: {exc}", photo=label
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as exc:
        # PIL reports truncation as OSError("image file is truncated ...").
        what = "truncated" if "truncat" in str(exc).lower() else "corrupt"
        raise PhotoRejected(
            f"{label}: the {fmt} data is {what} and cannot be decoded ({exc})",
            photo=label,
        ) from None


def _to_rgb_array(image: Image.Image, label: str) -> np.ndarray:
    try:
        return _rgb_pixels(image, label)
    except (OSError, ValueError, TypeError) as exc:
        # A palette or pixel format the header allowed but the data does not bear out.
        raise PhotoRejected(
            f"{label}: the {image.format or 'image'} pixels ({image.mode}) cannot be "
            f"converted to RGB ({exc})",
            photo=label,
        ) from None


def _rgb_pixels(image: Image.Image, label: str) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale PNGs: PIL's RGB conversion clips at 255 (almost
        # all white), so rescale to 8 bits ourselves. Mode "I" from a PNG
        # holds 16-bit samples too.
        grey = (np.asarray(image, dtype=np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        array = np.repeat(grey[:, :, None], 3, axis=2)
    else:
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
            # Transparent pixels carry arbitrary colours; show them as white,
            # as viewers do, rather than as whatever was stored underneath.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        # convert() copies even an RGB image; asarray makes the one copy needed.
        array = np.asarray(image if mode == "RGB" else image.convert("RGB"), dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:  # pragma: no cover - PIL guarantees this
        raise PhotoRejected(f"{label}: unexpected pixel layout {array.shape}", photo=label)
    return np.ascontiguousarray(array)
