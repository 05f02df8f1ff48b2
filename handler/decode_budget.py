"""The decode budget: what one image may cost a worker, checked before and while it is decoded.

Pixel count and aspect ratio (:class:`handler.preprocessing.DecodeLimits`) do not bound the
cost of decoding: a 119 KB progressive JPEG whose last scan is repeated 1000 times decodes every
repeat (12 s at 4000x3000), and a 63 KB 16-bit PNG declares 27 million pixels. So before Pillow
sees the bytes, :func:`check_structure` walks the file's own structure (JPEG markers, PNG and
RIFF chunks, GIF blocks, TIFF directories) without decoding anything, counting scans, segments
and frames; then :meth:`DecodeBudget.check_raster`, once the header is read and the JPEG draft
scale chosen, refuses an image whose pixels would take more memory than the budget or that
claims far more pixels than its bytes can hold for a photo. Conversions that follow stay within
the raster's own size (:func:`to_8bit_grey`, :func:`reduction_factor`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from handler.errors import DecodeBudgetError, DecodeMemoryError


@dataclass(frozen=True)
class DecodeBudget:
    """Limits on the work an image's bytes can ask of a worker (``handler:`` settings).

    Attributes:
        max_decoded_bytes: Largest memory the decoded raster may take (Pillow's own storage,
            4 bytes per RGB pixel, plus a full-size conversion where one is needed), and the
            largest coefficient buffer of a progressive (multi-scan) JPEG, which libjpeg keeps
            at full resolution whatever the draft scale.
        max_jpeg_scans: Most scans (SOS markers) a JPEG may have. libjpeg's progressive
            encoders write 10 (colour) or 6 (greyscale); each scan is decoded over the whole image.
        max_segments: Most JPEG marker segments, PNG chunks, RIFF chunks, GIF blocks or TIFF
            directory entries and array values: Pillow reads each one in Python.
        max_frames: Most frames of an animated GIF, PNG or WebP or a multi-page TIFF (only the
            first is ever decoded).
        max_pixels_per_byte: Largest width x height per byte of the file, for images of at least
            ``ratio_check_min_pixels``: real photographs measure 1-15 (JPEG), a 10x upscale ~37;
            a flat 27-megapixel PNG in 63 KB is 428.
        ratio_check_min_pixels: Images with fewer pixels are cheap whatever their compression
            (a flat 600x450 test frame is ~270 pixels per byte).
    """

    max_decoded_bytes: int = 128 * 1024 * 1024
    max_jpeg_scans: int = 32
    max_segments: int = 20_000
    max_frames: int = 64
    max_pixels_per_byte: float = 200.0
    ratio_check_min_pixels: int = 4_000_000

    def check_structure(self, data: bytes) -> None:
        """Walk the file's structure from its bytes, decoding nothing; see :func:`check_structure`."""
        check_structure(data, self)

    def check_raster(self, image: Image.Image, data_size: int, full_size: tuple[int, int]) -> None:
        """Refuse an opened image whose decode would cost more than the budget.

        Args:
            image: The opened image, JPEG draft already chosen (its ``size`` is what is decoded).
            data_size: Length of the encoded bytes.
            full_size: ``(width, height)`` the header declares.

        Raises:
            DecodeBudgetError: More pixels per byte than :attr:`max_pixels_per_byte`.
            DecodeMemoryError: A raster above :attr:`max_decoded_bytes`.
        """
        pixels = full_size[0] * full_size[1]
        ratio = pixels / max(data_size, 1)
        if pixels >= self.ratio_check_min_pixels and ratio > self.max_pixels_per_byte:
            raise DecodeBudgetError(
                f"image declares {full_size[0]}x{full_size[1]} pixels in {data_size} bytes, {ratio:.0f} pixels per byte; "
                f"the limit is {self.max_pixels_per_byte:g} (max_pixels_per_byte): photographs are far denser",
                limit="max_pixels_per_byte", value=round(ratio, 1), allowed=self.max_pixels_per_byte)
        decoded = raster_bytes(image.mode, image.size)
        if decoded > self.max_decoded_bytes:
            raise DecodeMemoryError(
                f"decoding this {full_size[0]}x{full_size[1]} {image.mode} image would take {decoded // 2**20} MiB; "
                f"the limit is {self.max_decoded_bytes // 2**20} MiB (max_decoded_bytes)",
                limit="max_decoded_bytes", value=decoded, allowed=self.max_decoded_bytes)


# Bytes per pixel of Pillow's storage of a mode, and of the full-size copy the conversion to RGB
# must make for modes that cannot be reduced first (palette and bilevel images are converted
# before :func:`reduction_factor` can shrink them; 16- and 32-bit greyscale become 8-bit "L").
_STORED = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_CONVERSION = {"1": 4, "P": 4, "PA": 4, "I;16": 1, "I;16L": 1, "I;16B": 1, "I;16N": 1, "I": 1, "F": 1}


def raster_bytes(mode: str, size: tuple[int, int]) -> int:
    """Memory Pillow takes to hold an image of this mode and size, plus its first full-size conversion."""
    return size[0] * size[1] * (_STORED.get(mode, 4) + _CONVERSION.get(mode, 0))


def reduction_factor(size: tuple[int, int], target_side: int | None, gap: int = 3) -> int:
    """The integer box-reduction that keeps the shorter side at least ``gap`` times ``target_side``.

    Reducing by an integer factor right after decoding (Pillow's ``reduce``, the first step of
    ``resize(..., reducing_gap=...)``) makes every later copy (alpha compositing, conversion,
    EXIF rotation) small; the remaining resize by a factor of at least 3 gives what a resize of
    the full image gives, up to rounding. An image already within that size is left alone, so
    the 600x450 photos of real traffic are processed exactly as before.
    """
    if not target_side:
        return 1
    return max(1, min(size) // (gap * target_side))


def to_8bit_grey(image: Image.Image, band_pixels: int = 1 << 18) -> Image.Image:
    """A 16- or 32-bit greyscale image (``I;16*``, ``I``, ``F``) as 8-bit ``L``, band by band.

    16-bit values are rescaled from 0..65535, 32-bit ones from 0..255 unless they exceed it
    (then from 0..65535), rounded to the nearest level as before; the work is done on bands of
    about ``band_pixels`` pixels, never on a full-size float64 copy (27 MP would be 216 MB).
    """
    width, height = image.size
    rows = max(1, band_pixels // max(width, 1))
    sixteen_bit = image.mode.startswith("I;16")
    scale = 65535.0
    if not sixteen_bit:
        _, high = image.getextrema()
        scale = 65535.0 if high > 255 else 255.0
    out = np.empty((height, width), np.uint8)
    for top in range(0, height, rows):
        band = np.asarray(image.crop((0, top, width, min(height, top + rows))))
        if sixteen_bit:  # round(v * 255 / 65535) = round(v / 257) = (v + 128) // 257, in integers
            out[top:top + band.shape[0]] = (band.astype(np.uint32) + 128) // 257
        else:
            out[top:top + band.shape[0]] = np.clip(np.rint(band.astype(np.float64) / scale * 255.0), 0, 255)
    return Image.fromarray(out)


def has_alpha(image: Image.Image) -> bool:
    """Whether the image carries transparency (composited onto black, the dermoscopic background)."""
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info)


def reduce_to_rgb(image: Image.Image, factor: int, band_pixels: int = 1 << 20) -> Image.Image:
    """Box-reduce by ``factor`` into RGB, transparency composited onto black, one band of rows at a time.

    Each band is converted (palette, greyscale, CMYK) and premultiplied by its alpha, which is
    what compositing onto opaque black gives, bit for bit, before it is reduced: no full-size
    RGBA copy, background or composite is ever made (three of them cost 0.6 GB at 6300x6300).
    Bands start at multiples of ``factor``, so the result equals one ``reduce`` of the whole.
    """
    width, height = image.size
    alpha = has_alpha(image)
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    step = factor * max(1, band_pixels // (width * factor))
    for top in range(0, height, step):
        band = image.crop((0, top, width, min(height, top + step)))
        band = band.convert("RGBA").convert("RGBa") if alpha else band.convert("RGB")
        if factor > 1:
            band = band.reduce(factor)
        if alpha:
            band = Image.merge("RGB", band.split()[:3])
        out.paste(band, (0, top // factor))
    return out


class _Walk:
    """Counts segments against the budget while a format's structure is walked."""

    def __init__(self, budget: DecodeBudget, fmt: str) -> None:
        self.budget, self.fmt, self.segments, self.frames = budget, fmt, 0, 0

    def segment(self, count: int = 1) -> None:
        self.segments += count
        if self.segments > self.budget.max_segments:
            raise DecodeBudgetError(
                f"{self.fmt} file has more than {self.budget.max_segments} segments (markers, chunks, blocks or "
                "directory values); the limit is max_segments", limit="max_segments", value=self.segments,
                allowed=self.budget.max_segments)

    def frame(self, count: int = 1) -> None:
        self.frames += count
        if self.frames > self.budget.max_frames:
            raise DecodeBudgetError(
                f"{self.fmt} image has more than {self.budget.max_frames} frames; the limit is max_frames "
                "(only the first frame is used: send a single image)", limit="max_frames", value=self.frames,
                allowed=self.budget.max_frames)


def check_structure(data: bytes, budget: DecodeBudget) -> None:
    """Walk an image file's structure, decoding nothing, and refuse what would cost too much.

    A structure that is malformed or cut short ends the walk quietly: Pillow then refuses it
    as an invalid image, with the error clients already know.

    Raises:
        DecodeBudgetError: More scans, segments or frames than the budget allows.
        DecodeMemoryError: A progressive JPEG whose coefficient buffer exceeds the memory budget.
    """
    if data[:2] == b"\xff\xd8":
        _jpeg(data, _Walk(budget, "JPEG"))
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        _png(data, _Walk(budget, "PNG"))
    elif data[:6] in (b"GIF87a", b"GIF89a"):
        _gif(data, _Walk(budget, "GIF"))
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        _webp(data, _Walk(budget, "WebP"))
    elif data[:4] in (b"II*\x00", b"MM\x00*"):
        _tiff(data, _Walk(budget, "TIFF"))


# A marker inside entropy-coded data: 0xFF followed by anything but a stuffed 0x00, a restart
# marker or another 0xFF fill byte. Searched by the regex engine, not a Python loop.
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg(data: bytes, walk: _Walk) -> None:
    budget, pos, scans, components, size = walk.budget, 2, 0, [], (0, 0)
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            pos += 2
            continue
        walk.segment()
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _SOF_MARKERS and end <= len(data) and pos + 10 <= end:
            size = (int.from_bytes(data[pos + 7:pos + 9], "big"), int.from_bytes(data[pos + 5:pos + 7], "big"))
            components = [(data[pos + 11 + 3 * i] >> 4, data[pos + 11 + 3 * i] & 15)
                          for i in range(data[pos + 9]) if pos + 12 + 3 * i <= end]
        if marker == 0xDA:
            scans += 1
            if scans > budget.max_jpeg_scans:
                raise DecodeBudgetError(
                    f"JPEG has more than {budget.max_jpeg_scans} scans; the limit is max_jpeg_scans (a progressive "
                    "JPEG has about 10, each decoded over the whole image)", limit="max_jpeg_scans", value=scans,
                    allowed=budget.max_jpeg_scans)
            found = _NEXT_MARKER.search(data, end)
            if found is None:
                return
            pos = found.start()
            continue
        pos = end
    if scans > 1 and components:
        # libjpeg buffers the whole image's DCT coefficients (2 bytes each) for any multi-scan
        # file, at full resolution whatever the draft scale.
        coefficients = _coefficient_bytes(size, components)
        if coefficients > budget.max_decoded_bytes:
            raise DecodeMemoryError(
                f"this {size[0]}x{size[1]} multi-scan JPEG needs {coefficients // 2**20} MiB of coefficients to decode; "
                f"the limit is {budget.max_decoded_bytes // 2**20} MiB (max_decoded_bytes)",
                limit="max_decoded_bytes", value=coefficients, allowed=budget.max_decoded_bytes)


def _coefficient_bytes(size: tuple[int, int], components: list[tuple[int, int]]) -> int:
    h_max = max((h for h, _ in components), default=1) or 1
    v_max = max((v for _, v in components), default=1) or 1
    mcus_x, mcus_y = -(-size[0] // (8 * h_max)), -(-size[1] // (8 * v_max))
    return sum(mcus_x * h * mcus_y * v for h, v in components) * 64 * 2


def _png(data: bytes, walk: _Walk) -> None:
    pos, animated = 8, False
    while pos + 8 <= len(data):
        walk.segment()
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind == b"acTL" and pos + 12 <= len(data):
            animated = True
            walk.frame(int.from_bytes(data[pos + 8:pos + 12], "big"))  # the frame count it declares
            walk.frames = 0  # then each frame control chunk is counted as it comes
        elif kind == b"fcTL" and animated:
            walk.frame()
        elif kind == b"IEND":
            return
        pos += 12 + length


def _gif(data: bytes, walk: _Walk) -> None:
    if len(data) < 13:
        return
    flags, pos = data[10], 13
    if flags & 0x80:
        pos += 3 << ((flags & 7) + 1)
    while pos < len(data):
        walk.segment()
        kind = data[pos]
        if kind == 0x3B:  # trailer
            return
        if kind == 0x2C:  # image descriptor: one frame
            walk.frame()
            if pos + 10 > len(data):
                return
            local = data[pos + 9]
            pos += 10 + ((3 << ((local & 7) + 1)) if local & 0x80 else 0) + 1  # + LZW minimum code size
        elif kind == 0x21:  # extension: label, then sub-blocks
            pos += 2
        else:
            return
        while pos < len(data) and data[pos]:  # sub-blocks of at most 255 bytes
            pos += 1 + data[pos]
        pos += 1


def _webp(data: bytes, walk: _Walk) -> None:
    pos = 12
    while pos + 8 <= len(data):
        walk.segment()
        kind, length = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if kind == b"ANMF":
            walk.frame()
        pos += 8 + length + (length & 1)


# TIFF field types whose values Pillow unpacks into Python tuples, by their size in bytes.
_TIFF_ARRAY_TYPES = {3: 2, 4: 4, 5: 8, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8, 17: 8, 18: 8}


def _tiff(data: bytes, walk: _Walk) -> None:
    order = "little" if data[:2] == b"II" else "big"
    offset, seen = int.from_bytes(data[4:8], order), set()
    while 8 <= offset < len(data) and offset not in seen:
        seen.add(offset)
        walk.frame()
        entries = int.from_bytes(data[offset:offset + 2], order)
        walk.segment(entries)
        for index in range(entries):
            entry = offset + 2 + 12 * index
            if entry + 12 > len(data):
                return
            field_type = int.from_bytes(data[entry + 2:entry + 4], order)
            if field_type in _TIFF_ARRAY_TYPES:
                walk.segment(int.from_bytes(data[entry + 4:entry + 8], order))
        next_at = offset + 2 + 12 * entries
        offset = int.from_bytes(data[next_at:next_at + 4], order) if next_at + 4 <= len(data) else 0
