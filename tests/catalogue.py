"""A catalogue of hostile and unusual inputs, each with the answer the service must give."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Case:
    """One request and what must come back.

    Attributes:
        name: What the case is.
        body: Raw request body (bytes) or a JSON object.
        status: Expected HTTP status.
        error_code: Expected ``error.code`` for a 4xx, None for a 200.
        clean: Bytes of the clean equivalent image, whose prediction must be the same.
        content_type: The Content-Type a raw body is sent with; a dict body is always JSON.
    """

    name: str
    body: bytes | dict[str, Any]
    status: int
    error_code: str | None = None
    clean: bytes | None = None
    content_type: str = "application/octet-stream"
    # A colourless rendering of a dermoscopic image sits at the input gate's threshold (HAM10000
    # is colour dermoscopy): served, it may be refused as out of distribution instead of answered.
    gate_may_refuse: bool = False

    def row(self) -> dict[str, Any]:
        """The request row TorchServe's backend hands the handler for this request.

        It parses a JSON content type itself (``ts.protocol.otf_message_handler``): into any JSON
        value, or, when that fails, the raw bytes (logging a traceback).
        """
        if isinstance(self.body, dict):
            return {"body": self.body}
        if self.content_type == "application/json":
            try:
                return {"body": json.loads(self.body.decode("utf-8"))}
            except Exception:  # noqa: BLE001 - exactly what TorchServe does
                return {"body": self.body}
        return {"body": self.body}

    @property
    def row_content_type(self) -> str:
        """The Content-Type TorchServe reports for the body of :meth:`row`."""
        return "application/json" if isinstance(self.body, dict) else self.content_type


def encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    """Encode a PIL image."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height but whose data is a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def png_with_chunk(image: Image.Image, kind: bytes, data: bytes) -> bytes:
    """A PNG of ``image`` with one extra ancillary chunk inserted after IHDR."""
    png = encode(image, "PNG")
    chunk = struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    end_of_ihdr = 8 + 8 + 13 + 4
    return png[:end_of_ihdr] + chunk + png[end_of_ihdr:]


def build_catalogue(lesion_jpeg: bytes) -> list[Case]:
    """Every case, built from one real dermoscopic JPEG.

    Args:
        lesion_jpeg: A real 600x450 dermoscopic JPEG.
    """
    lesion = Image.open(io.BytesIO(lesion_jpeg)).convert("RGB")
    grey = lesion.convert("L")
    rgba = lesion.convert("RGBA")
    alpha = np.full((lesion.height, lesion.width), 255, np.uint8)
    alpha[:, :60] = 0  # a transparent margin, composited onto black
    rgba.putalpha(Image.fromarray(alpha))
    blackened = np.asarray(lesion).copy()
    blackened[:, :60] = 0
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; viewers rotate 90 degrees clockwise
    stored_on_side = lesion.transpose(Image.Transpose.ROTATE_90)
    sixteen_bit = Image.fromarray(np.asarray(grey, dtype=np.uint16) * 257)
    corrupted = bytearray(encode(lesion, "PNG"))
    corrupted[200:400] = bytes(200)
    animated = [lesion.convert("P"), lesion.transpose(Image.Transpose.FLIP_LEFT_RIGHT).convert("P")]
    valid = 200
    return [
        Case("empty body", b"", 400, "empty_body"),
        Case("not an image", b"%PDF-1.4 definitely not a picture" * 20, 415, "invalid_image"),
        Case("truncated JPEG", lesion_jpeg[: len(lesion_jpeg) // 2], 415, "invalid_image"),
        Case("corrupted PNG", bytes(corrupted), 415, "invalid_image"),
        Case("zero width", png_with_header(0, 450), 415, "invalid_image"),
        Case("decompression bomb header", png_with_header(100_000, 100_000), 413, "image_too_large"),
        Case("over the configured pixel limit", png_with_header(8000, 8000), 413, "image_too_large"),
        Case("1x1 image", encode(Image.new("RGB", (1, 1), (90, 60, 50)), "PNG"), 422, "bad_image_dimensions"),
        Case("16-bit PNG", encode(sixteen_bit, "PNG"), valid, clean=encode(grey.convert("RGB"), "PNG"), gate_may_refuse=True),
        Case("CMYK JPEG", encode(lesion.convert("CMYK"), "JPEG", quality=95), valid),
        Case("greyscale", encode(grey, "PNG"), valid, clean=encode(grey.convert("RGB"), "PNG"), gate_may_refuse=True),
        Case("RGBA with transparency", encode(rgba, "PNG"), valid, clean=encode(Image.fromarray(blackened), "PNG")),
        Case("palette GIF", encode(lesion.convert("P"), "GIF"), valid),
        Case("animated GIF (first frame)", encode(animated[0], "GIF", save_all=True, append_images=animated[1:]), valid,
             clean=encode(animated[0], "GIF")),
        Case("animated WebP (first frame)", encode(lesion, "WEBP", lossless=True, save_all=True,
                                                   append_images=[lesion.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]),
             valid, clean=encode(lesion, "WEBP", lossless=True)),
        Case("TIFF", encode(lesion, "TIFF"), valid, clean=encode(lesion, "PNG")),
        # Quality 100 without chroma subsampling, so that the rotated re-encode is nearly lossless.
        Case("EXIF-rotated JPEG", encode(stored_on_side, "JPEG", quality=100, subsampling=0, exif=exif.tobytes()), valid,
             clean=encode(lesion, "JPEG", quality=100, subsampling=0)),
        Case("invalid base64 in JSON", {"image": "this is *not* base64!"}, 400, "invalid_base64"),
        Case("JSON without an image", {"picture": base64.b64encode(lesion_jpeg).decode()}, 400, "missing_image"),
        Case("unknown target_class", {"image": base64.b64encode(lesion_jpeg).decode(), "target_class": "cancer"}, 400,
             "invalid_option"),
        # A multi-megabyte option: refused, and not echoed back whole (checked in the tests).
        Case("huge target_class", {"image": base64.b64encode(lesion_jpeg).decode(), "target_class": "x" * 2_000_000},
             400, "invalid_option"),
        Case("non-boolean gradcam", {"image": base64.b64encode(lesion_jpeg).decode(), "gradcam": {"a": 1}}, 400,
             "invalid_option"),
        # JSON bodies of every shape but an object: TorchServe parses them itself.
        *[Case(f"JSON scalar {text}", text.encode(), 400, "malformed_json", content_type="application/json")
          for text in ("-1", "1.5", "1e999", '"a string"', "true", "null")],
        Case("JSON list", b"[1, 2, 3]", 400, "malformed_json", content_type="application/json"),
        Case("deeply nested JSON array", b"[" * 5000, 400, "malformed_json", content_type="application/json"),
        Case("unparseable JSON", b"{\"image\": ", 400, "malformed_json", content_type="application/json"),
        Case("image sent as JSON content type", lesion_jpeg, 200, content_type="application/json"),
        # Pillow raises struct.error reading a 4-byte eXIf chunk; the image itself is fine.
        Case("PNG with a 4-byte eXIf chunk", png_with_chunk(lesion, b"eXIf", b"II*\x00"), valid,
             clean=encode(lesion, "PNG")),
        # Thin strips: a few hundred bytes that the resize would make over a million pixels.
        Case("300000x8 PNG", encode(Image.new("RGB", (300_000, 8), (90, 60, 50)), "PNG"), 422, "bad_image_dimensions"),
        Case("40000x8 PNG", encode(Image.new("RGB", (40_000, 8), (90, 60, 50)), "PNG"), 422, "bad_image_dimensions"),
        Case("8x100 PNG (aspect 12.5:1)", encode(Image.new("RGB", (8, 100), (90, 60, 50)), "PNG"), 422,
             "bad_image_dimensions"),
        # Formats outside the accepted list are refused from their signature, before decoding.
        Case("ICO", encode(lesion.resize((64, 64)), "ICO"), 415, "unsupported_format"),
        Case("JPEG 2000", encode(lesion.resize((64, 48)), "JPEG2000"), 415, "unsupported_format"),
        Case("PPM", encode(lesion.resize((64, 48)), "PPM"), 415, "unsupported_format"),
    ]


# Decoder amplification (issue 27): small files whose decoding costs seconds or hundreds of MB.
# Generated here (each in well under a second), never committed as binaries.

def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def flat_png(width: int, height: int, bit_depth: int = 8, colour_type: int = 2, value: int = 0x80,
             pixels_per_byte: float | None = None) -> bytes:
    """A PNG of one flat colour: tens of millions of pixels in tens of kilobytes.

    With ``pixels_per_byte``, rows of noise are spread through it until the file is about that
    dense, so that it passes the compression-ratio check and its pixels really are decoded.
    """
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\x00" + bytes([value]) * (width * channels * bit_depth // 8)
    noisy = 0 if pixels_per_byte is None else int(width * height / pixels_per_byte) // len(row) + 1
    every = height // noisy if noisy else height + 1
    noise = np.random.default_rng(0).integers(0, 256, len(row) - 1, dtype=np.uint8).tobytes()
    compressor = zlib.compressobj(6)
    parts = []
    for top in range(0, height, every):
        rows = min(every, height - top)
        if noisy:
            parts.append(compressor.compress(b"\x00" + noise))
            rows -= 1
        parts.append(compressor.compress(row * rows))
    idat = b"".join(parts) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def progressive_jpeg_with_repeated_scan(width: int, height: int, repeats: int) -> bytes:
    """A progressive JPEG whose last scan (an AC refinement, decoded over every block) is repeated.

    libjpeg decodes each repeat over the whole image, so the cost grows with ``repeats`` while
    the file grows by a few bytes per repeat (a flat image's refinement scan is all end-of-band runs).
    """
    jpeg = encode(Image.new("RGB", (width, height), (150, 110, 100)), "JPEG", quality=90, progressive=True)
    last_scan = jpeg.rindex(b"\xff\xda")
    return jpeg[:-2] + jpeg[last_scan:-2] * repeats + b"\xff\xd9"


def apng(width: int, height: int, frames: int) -> bytes:
    """An animated PNG declaring and holding ``frames`` flat frames."""
    idat = zlib.compress((b"\x00" + b"\x80" * width * 3) * height, 9)
    def frame_control(sequence: int) -> bytes:
        return png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", sequence, width, height, 0, 0, 1, 10, 0, 0))

    chunks = [frame_control(0), png_chunk(b"IDAT", idat)]
    for frame in range(1, frames):
        chunks += [frame_control(2 * frame - 1), png_chunk(b"fdAT", struct.pack(">I", 2 * frame) + idat)]
    body = b"".join(chunks)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"acTL", struct.pack(">II", frames, 0))
            + body + png_chunk(b"IEND", b""))


def many_frame_gif(width: int, height: int, frames: int) -> bytes:
    """A GIF whose one flat frame is repeated ``frames`` times."""
    single = encode(Image.new("P", (width, height), 1), "GIF")
    start = single.index(b"\x2c", 13 + (3 << ((single[10] & 7) + 1) if single[10] & 0x80 else 0))
    return single[:start] + single[start:-1] * frames + b"\x3b"


def many_page_tiff(width: int, height: int, pages: int) -> bytes:
    """A TIFF of ``pages`` pages: one flat page's directory, chained ``pages`` times to the same pixels."""
    single = encode(Image.new("RGB", (width, height), (150, 110, 100)), "TIFF")
    first = int.from_bytes(single[4:8], "little")
    entries = int.from_bytes(single[first:first + 2], "little")
    directory = single[first:first + 2 + 12 * entries]
    copies, offset = [], len(single)
    for page in range(1, pages):
        offset += len(directory) + 4
        copies.append(directory + (offset if page < pages - 1 else 0).to_bytes(4, "little"))
    next_at = first + 2 + 12 * entries
    return single[:next_at] + len(single).to_bytes(4, "little") + single[next_at + 4:] + b"".join(copies)


def many_frame_webp(width: int, height: int, frames: int) -> bytes:
    """An animated WebP of ``frames`` alternating flat frames (identical ones would be merged)."""
    images = [Image.new("RGB", (width, height), (150, 110, 100 + i % 2)) for i in range(frames)]
    return encode(images[0], "WEBP", lossless=True, save_all=True, append_images=images[1:])


def jpeg_with_comment_segments(lesion_jpeg: bytes, count: int) -> bytes:
    """A real JPEG with ``count`` empty comment segments before its image: Pillow reads each in Python."""
    return lesion_jpeg[:2] + b"\xff\xfe\x00\x02" * count + lesion_jpeg[2:]


def png_with_empty_chunks(lesion: Image.Image, count: int) -> bytes:
    """A real PNG with ``count`` empty ancillary chunks after its header."""
    png = encode(lesion, "PNG")
    end_of_ihdr = 8 + 8 + 13 + 4
    return png[:end_of_ihdr] + png_chunk(b"zzZz", b"") * count + png[end_of_ihdr:]


@dataclass(frozen=True)
class Attack:
    """A small file whose decoding used to cost a worker seconds or hundreds of MB.

    Attributes:
        name: What it is.
        make: Builds the bytes (a few MB at most, in well under a second).
        status: The answer the service must give now.
        error_code: Its ``error.code``, None for a 200.
        limit: The budget setting a refusal names (``error.details.limit``), if any.
    """

    name: str
    make: Any
    status: int
    error_code: str | None = None
    limit: str | None = None


def amplification_catalogue(lesion_jpeg: bytes) -> list[Attack]:
    """The decoder-amplification attacks of issue 27 and their multi-frame and segment variants."""
    lesion = Image.open(io.BytesIO(lesion_jpeg)).convert("RGB")
    budget = memory = "decode_budget_exceeded"
    return [
        Attack("progressive JPEG 4000x3000, last scan x1000", lambda: progressive_jpeg_with_repeated_scan(4000, 3000, 1000),
               422, budget, "max_jpeg_scans"),
        Attack("progressive JPEG 7296x5472, last scan x3000", lambda: progressive_jpeg_with_repeated_scan(7296, 5472, 3000),
               422, budget, "max_jpeg_scans"),
        Attack("16-bit greyscale PNG 6000x4500", lambda: flat_png(6000, 4500, 16, 0), 422, budget, "max_pixels_per_byte"),
        Attack("16-bit greyscale PNG 6300x6300", lambda: flat_png(6300, 6300, 16, 0), 422, budget, "max_pixels_per_byte"),
        Attack("RGBA PNG 6300x6300", lambda: flat_png(6300, 6300, 8, 6), 422, budget, "max_pixels_per_byte"),
        # Dense enough to pass the compression-ratio check: decoded, within the memory budget.
        Attack("16-bit greyscale PNG 6300x6300, 150 pixels per byte", lambda: flat_png(6300, 6300, 16, 0, pixels_per_byte=150),
               200),
        Attack("RGBA PNG 5600x4200, 150 pixels per byte", lambda: flat_png(5600, 4200, 8, 6, pixels_per_byte=150), 200),
        Attack("RGBA PNG 6300x6300, 150 pixels per byte", lambda: flat_png(6300, 6300, 8, 6, pixels_per_byte=150),
               413, memory, "max_decoded_bytes"),
        Attack("progressive JPEG 7296x5472, 32 scans (the limit)", lambda: progressive_jpeg_with_repeated_scan(7296, 5472, 22),
               200),
        Attack("APNG 600x450, 2000 frames", lambda: apng(600, 450, 2000), 422, budget, "max_frames"),
        Attack("GIF 600x450, 10000 frames", lambda: many_frame_gif(600, 450, 10_000), 422, budget, "max_frames"),
        Attack("TIFF 64x48, 2000 pages", lambda: many_page_tiff(64, 48, 2000), 422, budget, "max_frames"),
        Attack("WebP 600x450, 100 frames", lambda: many_frame_webp(600, 450, 100), 422, budget, "max_frames"),
        Attack("JPEG with 1 million comment segments", lambda: jpeg_with_comment_segments(lesion_jpeg, 1_000_000),
               422, budget, "max_segments"),
        Attack("PNG with 1 million empty chunks", lambda: png_with_empty_chunks(lesion, 1_000_000), 422, budget,
               "max_segments"),
    ]
