"""A deterministic set of synthetic images that are not dermoscopic photographs.

The out-of-distribution gate (:mod:`handler.input_gate`) must refuse more than the
everyday photos of ``../shared/data/ood-imagenet``: flat or noisy frames, documents,
screenshots, a camera held against a lens cap. None of these are in a public photo set, so
they are drawn here, from a fixed seed, and returned as the encoded bytes a client would
send (JPEG or PNG), so that they go through the served decode and resize like any request.

Every image gets its own random generator derived from ``(seed, index)``, so the set is
the same on every run and one image does not depend on how many were drawn before it.
Kinds rotate through :data:`KINDS` so that each is equally represented; sizes and aspect
ratios (at most 4:1, either orientation) vary per image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

MAX_ASPECT = 4.0
MIN_SIDE = 24

_WORDS = ("the of and to in is for on that with as by this from at are be or an it report patient invoice total "
          "date page section table figure results method summary account order number please contact address "
          "meeting agenda budget project status review note version update settings file edit view help "
          "window search profile login password submit cancel open save print share download upload").split()


@dataclass(frozen=True)
class SyntheticImage:
    """One generated image, encoded.

    Attributes:
        name: Unique, stable name: ``<index>_<kind>.<format>``.
        kind: One of :data:`KINDS`.
        size: ``(width, height)`` in pixels.
        format: ``jpeg`` or ``png``.
        data: The encoded bytes.
    """

    name: str
    kind: str
    size: tuple[int, int]
    format: str
    data: bytes


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def _flat(rng: np.random.Generator, width: int, height: int, index: int) -> Image.Image:
    # Black, white and grey first in every cycle of the rotation; random colours after them.
    fixed = [(0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 200, 200), (40, 40, 40)]
    cycle = index // len(KINDS)
    colour = fixed[cycle] if cycle < len(fixed) else _colour(rng)
    return Image.new("RGB", (width, height), colour)


def _uniform_noise(rng: np.random.Generator, width: int, height: int, index: int) -> Image.Image:
    if rng.random() < 0.3:  # greyscale noise
        grey = rng.integers(0, 256, size=(height, width, 1), dtype=np.uint8)
        return Image.fromarray(np.repeat(grey, 3, axis=2))
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _gaussian_noise(rng: np.random.Generator, width: int, height: int, index: int) -> Image.Image:
    mean = rng.uniform(30, 225, size=3)
    sigma = rng.uniform(5, 80)
    pixels = rng.normal(mean, sigma, size=(height, width, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _gradient(rng: np.random.Generator, width: int, height: int, index: int) -> Image.Image:
    start, end = np.array(_colour(rng), float), np.array(_colour(rng), float)
    ys, xs = np.mgrid[0:height, 0:width].astype(float)
    if rng.random() < 0.7:  # linear, in a random direction
        angle = rng.uniform(0, 2 * np.pi)
        t = xs * np.cos(angle) + ys * np.sin(angle)
    else:  # radial, from a random centre
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        t = np.hypot(xs - cx, ys - cy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    pixels = start + t[..., None] * (end - start)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled scalable font (needs FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _sentence(rng: np.random.Generator, words: int) -> str:
    return " ".join(_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), size=words))


def _document(rng: np.random.Generator, width: int, height: int, index: int) -> Image.Image:
    paper = (255, 255, 255) if rng.random() < 0.5 else tuple(int(v) for v in rng.integers(225, 256, size=3))
    image = Image.new("RGB", (width, height), paper)
    draw = ImageDraw.Draw(image)
    ink = (0, 0, 0) if rng.random() < 0.6 else tuple(int(v) for v in rng.integers(0, 90, size=3))
    size = int(np.clip(min(width, height) * rng.uniform(0.025, 0.07), 8, 40))
    margin = int(width * rng.uniform(0.04, 0.12))
    y = int(height * rng.uniform(0.03, 0.1))
    # A heading, then paragraphs of lines, now and then a horizontal rule or a table row.
    draw.text((margin, y), _sentence(rng, 3).title(), fill=ink, font=_font(int(size * 1.6)))
    y += int(size * 2.6)
    chars_per_line = max(4, int((width - 2 * margin) / (size * 0.55)))
    while y < height - size:
        roll = rng.random()
        if roll < 0.08:
            draw.line([(margin, y + size // 2), (width - margin, y + size // 2)], fill=ink, width=1)
        elif roll < 0.16:
            columns = int(rng.integers(2, 5))
            for c in range(columns):
                x0 = margin + c * (width - 2 * margin) // columns
                draw.rectangle([x0, y, x0 + (width - 2 * margin) // columns, y + int(size * 1.4)], outline=ink)
                draw.text((x0 + 3, y + 2), _WORDS[int(rng.integers(len(_WORDS)))], fill=ink, font=_font(size))
        else:
            line = _sentence(rng, int(rng.integers(3, 16)))[:chars_per_line]
            draw.text((margin, y), line, fill=ink, font=_font(size))
        y += int(size * rng.uniform(1.3, 2.2))
    return image


def _screenshot(rng: np.random.Generator, width: int, height: int, index: int) -> Image.Image:
    dark = rng.random() < 0.3
    desktop = _colour(rng)
    image = Image.new("RGB", (width, height), desktop)
    draw = ImageDraw.Draw(image)
    size = int(np.clip(min(width, height) * 0.04, 8, 24))
    for _ in range(int(rng.integers(1, 4))):  # overlapping windows
        w, h = int(width * rng.uniform(0.4, 1.0)), int(height * rng.uniform(0.4, 1.0))
        x0, y0 = int(rng.integers(0, max(1, width - w + 1))), int(rng.integers(0, max(1, height - h + 1)))
        body = (40, 42, 48) if dark else (245, 245, 245)
        text = (220, 220, 220) if dark else (30, 30, 30)
        accent = _colour(rng)
        bar = max(8, int(size * 1.6))
        draw.rectangle([x0, y0, x0 + w, y0 + h], fill=body, outline=(120, 120, 120))
        draw.rectangle([x0, y0, x0 + w, y0 + bar], fill=accent)
        draw.text((x0 + 6, y0 + 2), _sentence(rng, 2).title(), fill=(255, 255, 255), font=_font(size))
        for j, colour in enumerate([(237, 106, 94), (245, 191, 79), (98, 197, 84)]):  # window controls
            cx = x0 + w - (j + 1) * (bar + 2)
            draw.ellipse([cx, y0 + 2, cx + bar - 4, y0 + bar - 2], fill=colour)
        sidebar = int(w * rng.uniform(0.0, 0.3))
        if sidebar > 10:
            draw.rectangle([x0, y0 + bar, x0 + sidebar, y0 + h], fill=tuple(max(0, c - 20) for c in body))
            for k in range(int((h - bar) / (size * 2))):
                draw.text((x0 + 6, y0 + bar + 6 + k * size * 2), _WORDS[int(rng.integers(len(_WORDS)))], fill=text,
                          font=_font(size))
        y = y0 + bar + size
        while y < y0 + h - 2 * size:
            x = x0 + sidebar + size
            roll = rng.random()
            if roll < 0.35:  # a row of buttons
                for _ in range(int(rng.integers(1, 4))):
                    bw = int(size * rng.uniform(4, 8))
                    if x + bw > x0 + w:
                        break
                    draw.rounded_rectangle([x, y, x + bw, y + int(size * 1.8)], radius=max(2, size // 3), fill=accent)
                    draw.text((x + size // 2, y + size // 3), _WORDS[int(rng.integers(len(_WORDS)))],
                              fill=(255, 255, 255), font=_font(size))
                    x += bw + size
            elif roll < 0.55:  # an input box
                draw.rectangle([x, y, min(x0 + w - size, x + int(w * 0.5)), y + int(size * 1.8)],
                               fill=(255, 255, 255) if not dark else (25, 25, 30), outline=(150, 150, 150))
            else:
                draw.text((x, y), _sentence(rng, int(rng.integers(2, 9))), fill=text, font=_font(size))
            y += int(size * 2.4)
    return image


def _blurred(rng: np.random.Generator, width: int, height: int, index: int) -> Image.Image:
    image = Image.new("RGB", (width, height), _colour(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 12))):
        x0, y0 = rng.uniform(-0.2, 1.0) * width, rng.uniform(-0.2, 1.0) * height
        x1, y1 = x0 + rng.uniform(0.1, 0.7) * width, y0 + rng.uniform(0.1, 0.7) * height
        shape = [(x0, y0), (x1, y1)]
        if rng.random() < 0.5:
            draw.ellipse(shape, fill=_colour(rng))
        else:
            draw.rectangle(shape, fill=_colour(rng))
    return image.filter(ImageFilter.GaussianBlur(radius=max(width, height) * rng.uniform(0.03, 0.12)))


def _dark_noise(rng: np.random.Generator, width: int, height: int, index: int) -> Image.Image:
    level = rng.uniform(0, 25)
    sigma = rng.uniform(1, 8)
    pixels = rng.normal(level, sigma, size=(height, width, 1 if rng.random() < 0.5 else 3))
    pixels = np.broadcast_to(pixels, (height, width, 3))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def _checkerboard(rng: np.random.Generator, width: int, height: int, index: int) -> Image.Image:
    cell = int(rng.integers(2, max(3, min(width, height) // 3)))
    a, b = (0, 0, 0), (255, 255, 255)
    if rng.random() < 0.5:
        a, b = _colour(rng), _colour(rng)
    ys, xs = np.mgrid[0:height, 0:width]
    mask = ((xs // cell + ys // cell) % 2).astype(bool)
    pixels = np.where(mask[..., None], np.array(b, np.uint8), np.array(a, np.uint8))
    return Image.fromarray(pixels.astype(np.uint8))


_RENDERERS: dict[str, Callable[[np.random.Generator, int, int, int], Image.Image]] = {
    "flat": _flat,
    "uniform_noise": _uniform_noise,
    "gaussian_noise": _gaussian_noise,
    "gradient": _gradient,
    "document": _document,
    "screenshot": _screenshot,
    "blurred": _blurred,
    "dark_noise": _dark_noise,
    "checkerboard": _checkerboard,
}
KINDS: tuple[str, ...] = tuple(_RENDERERS)


def _size(rng: np.random.Generator) -> tuple[int, int]:
    """A random ``(width, height)``: longer side 64..1024, aspect ratio 1..4 (log-uniform), either orientation."""
    longer = int(rng.integers(64, 1025))
    aspect = float(np.exp(rng.uniform(0.0, np.log(MAX_ASPECT))))
    shorter = max(MIN_SIDE, int(round(longer / aspect)))
    return (longer, shorter) if rng.random() < 0.6 else (shorter, longer)


def _encode(image: Image.Image, rng: np.random.Generator) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    if rng.random() < 0.6:
        image.save(buffer, format="JPEG", quality=int(rng.integers(60, 96)))
        return "jpeg", buffer.getvalue()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def synthetic_image(index: int, seed: int = 0) -> SyntheticImage:
    """The ``index``-th image of the set drawn from ``seed`` (kind ``KINDS[index % len(KINDS)]``)."""
    rng = np.random.default_rng([seed, index])
    kind = KINDS[index % len(KINDS)]
    width, height = _size(rng)
    image = _RENDERERS[kind](rng, width, height, index)
    fmt, data = _encode(image, rng)
    return SyntheticImage(f"{index:04d}_{kind}.{'jpg' if fmt == 'jpeg' else 'png'}", kind, (width, height), fmt, data)


def generate(count: int = 300, seed: int = 0) -> list[SyntheticImage]:
    """``count`` synthetic non-dermoscopic images, the same bytes for the same ``(count, seed)``.

    Args:
        count: How many; kinds rotate, so ``count`` a multiple of ``len(KINDS)`` balances them.
        seed: Any integer; different seeds give independent sets (one to choose a method
            on, another to report on).
    """
    return [synthetic_image(i, seed) for i in range(count)]
