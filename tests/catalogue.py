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
