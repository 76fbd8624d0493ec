"""Image bytes from elsewhere are untrusted: checked here before a C decoder sees them.

torchvision's PNG decoder crashes the process (signal 11) on a stream whose image data is shorter than its header
says, whose chunk checksum is wrong or whose row filter is unknown, and every decoder allocates what a header
declares: a 47 KB PNG declaring 20000 x 20000 pixels takes 4.4 GiB. So a file's size is read from its header first
(by Pillow's format parsers, which raise errors rather than crash) and refused above a pixel limit, and a PNG's
structure is walked in full (chunk lengths and CRCs, the header's fields, the zlib stream's end and length, each
row's filter byte) before torchvision decodes it. The pixels of a valid file are torchvision's, as before.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from kdcache.errors import KdcacheError

# Pillow's own limit (1024 * 1024 * 1024 // 4 // 3 pixels, about 89 M): above it Pillow warns of a decompression bomb
DEFAULT_MAX_PIXELS = 89_478_485
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> samples per pixel, and the bit depths each allows (PNG specification, table 11.1)
PNG_COLOUR_TYPES = {0: (1, (1, 2, 4, 8, 16)), 2: (3, (8, 16)), 3: (1, (1, 2, 4, 8)), 4: (2, (8, 16)), 6: (4, (8, 16))}
# Adam7's passes: (first row, first column, row step, column step)
ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))


class BadImageError(ValueError):
    """Bytes that are no valid image: the reason, for the caller's one line."""


class TooManyPixelsError(BadImageError):
    """An image whose header declares more pixels than the limit."""


def check_image_bytes(raw: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) read from the header of an image file's bytes, after refusing a file above `max_pixels` and a
    PNG whose structure is not whole and valid; raises BadImageError saying why."""
    width, height = header_size(raw)
    if width * height > max_pixels:
        raise TooManyPixelsError(f"{width} x {height} pixels ({width * height:,}), above the limit of "
                                 f"{max_pixels:,}")
    if raw.startswith(PNG_SIGNATURE):
        check_png(raw)
    return width, height


def header_size(raw: bytes) -> tuple[int, int]:
    """(width, height) as the file's header declares them: read straight from a PNG's IHDR or a JPEG's frame
    header (most files, and what the loader reads per file), else parsed by the first Pillow format that takes the
    bytes (as `Image.open` does, less its decompression-bomb check: the caller's limit is the one that applies)."""
    if raw.startswith(PNG_SIGNATURE) and raw[12:16] == b"IHDR" and len(raw) >= 24:
        return struct.unpack(">II", raw[16:24])
    if raw.startswith(b"\xff\xd8"):
        return _jpeg_size(raw)
    Image.init()
    prefix = raw[:16]
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        if accept is not None and not accept(prefix):
            continue
        try:
            with factory(io.BytesIO(raw), "") as image:
                return image.size
        except (SyntaxError, IndexError, TypeError, struct.error, OSError, ValueError):
            continue
    raise BadImageError("no image format recognises its header")


# JPEG's start-of-frame markers (SOF0-SOF15 less DHT, JPG and DAC), whose segment holds the image's size
JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(raw: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header: its segments walked from the start, by their lengths."""
    at = 2
    while at + 4 <= len(raw):
        if raw[at] != 0xFF:
            raise BadImageError(f"its JPEG segments break off at byte {at} (damaged)")
        marker = raw[at + 1]
        if marker == 0xFF:  # a fill byte before a marker
            at += 1
            continue
        length = struct.unpack(">H", raw[at + 2:at + 4])[0]
        if marker in JPEG_FRAMES and length >= 7 and at + 9 <= len(raw):
            height, width = struct.unpack(">HH", raw[at + 5:at + 9])
            return width, height
        at += 2 + length
    raise BadImageError("its JPEG header ends before its frame header (truncated)")


def check_png(raw: bytes) -> None:
    """Refuse a PNG unless its chunks are whole with right CRCs, its header valid, and its image data one complete
    zlib stream of exactly the rows the header declares, each with a known filter."""
    chunks = _png_chunks(raw)
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise BadImageError("its first chunk is no 13-byte IHDR")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    samples, depths = PNG_COLOUR_TYPES.get(colour, (0, ()))
    if width == 0 or height == 0 or depth not in depths or compression or filtering or interlace not in (0, 1):
        raise BadImageError(f"its header is invalid ({width} x {height}, bit depth {depth}, colour type {colour}, "
                            f"compression {compression}, filter {filtering}, interlace {interlace})")
    rows = _row_lengths(width, height, samples * depth, interlace)
    data = _inflate(b"".join(body for kind, body in chunks if kind == b"IDAT"), sum(rows))
    starts = np.cumsum([0, *rows[:-1]])
    filters = np.frombuffer(data, np.uint8)[starts]
    if (filters > 4).any():
        raise BadImageError(f"row {int(np.flatnonzero(filters > 4)[0])} of its image data has filter "
                            f"{int(filters[filters > 4][0])}, not one of PNG's five (0-4)")


def _png_chunks(raw: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, data) of every chunk up to IEND, each checked against its length and CRC."""
    chunks, at = [], len(PNG_SIGNATURE)
    while True:
        if at + 12 > len(raw):
            raise BadImageError(f"it ends at byte {len(raw)} inside a chunk, before IEND (truncated)")
        length, kind = struct.unpack(">I4s", raw[at:at + 8])
        end = at + 8 + length
        if end + 4 > len(raw):
            raise BadImageError(f"its {kind.decode(errors='replace')} chunk declares {length} bytes, more than the "
                                f"file holds (truncated)")
        body = raw[at + 8:end]
        if zlib.crc32(kind + body) != struct.unpack(">I", raw[end:end + 4])[0]:
            raise BadImageError(f"its {kind.decode(errors='replace')} chunk at byte {at} fails its CRC (damaged)")
        chunks.append((kind, body))
        if kind == b"IEND":
            return chunks
        at = end + 4


def _row_lengths(width: int, height: int, bits_per_pixel: int, interlace: int) -> list[int]:
    """The byte length of every row of the decompressed image data, its filter byte included (Adam7's passes'
    rows in order when interlaced)."""
    def row(pixels: int) -> int:
        return 1 + (pixels * bits_per_pixel + 7) // 8

    if not interlace:
        return [row(width)] * height
    lengths = []
    for top, left, row_step, column_step in ADAM7:
        pass_width = (width - left + column_step - 1) // column_step
        pass_height = (height - top + row_step - 1) // row_step
        if pass_width and pass_height:
            lengths += [row(pass_width)] * pass_height
    return lengths


def _inflate(stream: bytes, expected: int) -> bytes:
    """The zlib stream decompressed, refused unless it ends and holds exactly `expected` bytes (at most that many
    are ever decompressed, so a stream that inflates without end costs nothing)."""
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(stream, expected + 1)
    except zlib.error as error:
        raise BadImageError(f"its image data is no valid zlib stream ({error})") from None
    if len(data) > expected:
        raise BadImageError(f"its image data holds more than the {expected} bytes its header declares (damaged)")
    if len(data) < expected or not inflater.eof:
        raise BadImageError(f"its image data holds {len(data)} bytes where its header declares {expected} "
                            f"({'an unfinished stream, ' if not inflater.eof else ''}truncated or damaged)")
    return data
