"""PNG and GIF images decoded with Pillow to native pixels, for ``bulkdata.describe``.

``decode`` refuses an image of more than ``MAX_PIXELS`` (from its header, before decoding),
decodes one image at a time whatever the number of workers (decoding holds ~12 bytes a pixel),
the first frame of an animated GIF only, to 8-bit RGB or MONOCHROME2 (a 16-bit grey PNG to 16
bits) with transparency laid on white, and writes the pixels band by band to a scratch file.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from PIL import Image
from pydicom.uid import ExplicitVRLittleEndian

from stowd.errors import FileProblem
from stowd.media import part10
from stowd.media.instance import Bulk, Pixels
from stowd.media.part10 import put, writing
from stowd.media.reading import Media

MAX_PIXELS = 25_000_000  # a larger PNG or GIF is refused: decoding holds ~12 bytes a pixel

# Pillow refuses images above its own limit; ours (checked from the header first) replaces it.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
_DECODING = threading.Lock()
_NAMES = {"png": "PNG image", "gif": "GIF image"}


def decode(
    fp: BinaryIO, media: Media, scratch: Path, check: Callable[[Pixels], None]
) -> tuple[Bulk, Pixels]:
    """Decode a PNG or GIF (the first frame of an animated GIF only) into ``scratch``.

    ``check`` may refuse the pixels (raise ``FileProblem``) before they are written.
    """
    with _DECODING:  # one image in memory at a time, whatever the number of workers
        return _decode(fp, media, scratch, check)


def _decode(
    fp: BinaryIO, media: Media, scratch: Path, check: Callable[[Pixels], None]
) -> tuple[Bulk, Pixels]:
    name = _NAMES[media.kind]
    if (media.rows or 0) * (media.columns or 0) > MAX_PIXELS:
        raise FileProblem(
            f"the {name} has {media.columns} x {media.rows} pixels, more than stowd decodes "
            f"({MAX_PIXELS // 1_000_000} megapixels)"
        )
    try:
        with Image.open(fp, formats=[media.kind.upper()]) as img:
            img.load()  # frame 0: an animated GIF gives its first frame only
            mode = _plain_mode(img)
            pixels = Pixels(
                img.height,
                img.width,
                3 if mode == "RGB" else 1,
                16 if mode == "I;16" else 8,
                "RGB" if mode == "RGB" else "MONOCHROME2",
                None,
            )
            check(pixels)
            length = _save(img, mode, scratch)
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # a read error of the source: tried again later
        raise FileProblem(f"the {name} is truncated or damaged: {exc}") from exc
    native = "application/octet-stream"
    return Bulk(scratch, 0, length, native, ExplicitVRLittleEndian, length), pixels


def _plain_mode(img: Image.Image) -> str:
    """What the pixels become: 8-bit ``RGB`` or grey ``L``, or 16-bit grey ``I;16``."""
    if img.mode.startswith("I"):
        return "I;16"
    grey = img.mode in ("1", "L", "LA", "La") or (img.mode in ("P", "PA") and _grey_palette(img))
    return "L" if grey else "RGB"


def _plain(band: Image.Image, mode: str) -> Image.Image:
    """A band of the image in ``mode``, transparency laid on white."""
    if mode == "I;16":
        return band if band.mode == "I;16" else band.convert("I;16")
    if band.has_transparency_data:
        background = Image.new("RGBA", band.size, (255, 255, 255, 255))
        band = Image.alpha_composite(background, band.convert("RGBA"))
    return band.convert(mode)


def _grey_palette(img: Image.Image) -> bool:
    palette = img.getpalette() or []
    return all(
        palette[i] == palette[i + 1] == palette[i + 2] for i in range(0, len(palette) - 2, 3)
    )


def _save(img: Image.Image, mode: str, scratch: Path) -> int:
    """Write the pixels to ``scratch`` band by band (each converted on its own, so only one
    band is ever held twice); return the number of bytes."""
    row = img.width * (2 if mode == "I;16" else 3 if mode == "RGB" else 1)
    band = max(1, part10.CHUNK // row)
    with writing(scratch, "the scratch file for the decoded pixels") as out:
        for top in range(0, img.height, band):
            part = img.crop((0, top, img.width, min(top + band, img.height)))
            put(out, _plain(part, mode).tobytes())
        return out.tell()
