"""Pictures for people: labelled panels (orthoslices, uncertainty maps) written as PNG."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw


def to_gray8(img: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    a = np.asarray(img, dtype=np.float64)
    lo = np.percentile(a, 0.5) if lo is None else lo
    hi = np.percentile(a, 99.5) if hi is None else hi
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((a - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def heat8(img: np.ndarray, hi: float | None = None) -> np.ndarray:
    """Uncertainty as an RGB heat map (black → red → yellow → white)."""
    a = np.asarray(img, dtype=np.float64)
    hi = float(np.percentile(a, 99.5)) if hi is None else hi
    t = np.clip(a / (hi if hi > 0 else 1.0), 0, 1)
    rgb = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], -1)
    return (rgb * 255).astype(np.uint8)


def panels_png(path: str, panels: list[tuple[str, np.ndarray]], scale: int = 2, pad: int = 6,
               caption: str = "") -> str:
    """Side-by-side panels, each (title, 2-D uint8 gray or (H, W, 3) RGB), upscaled by ``scale``;
    ``caption`` (e.g. a data credit) is written below them."""
    ims = []
    for title, arr in panels:
        a = np.asarray(arr)
        if a.ndim == 2:
            a = np.stack([a] * 3, -1)
        im = Image.fromarray(a.astype(np.uint8)).resize((a.shape[1] * scale, a.shape[0] * scale),
                                                          Image.NEAREST)
        ims.append((title, im))
    head = 16
    W = sum(im.width for _, im in ims) + pad * (len(ims) + 1)
    H = max(im.height for _, im in ims) + head + 2 * pad + (head if caption else 0)
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = pad
    for title, im in ims:
        draw.text((x, pad // 2), title, fill=(0, 0, 0))
        canvas.paste(im, (x, head + pad))
        x += im.width + pad
    if caption:
        draw.text((pad, H - head), caption, fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


def nearest_z(stack: np.ndarray, k: int, length: int) -> np.ndarray:
    """Repeat each section to show an anisotropic stack on the restored z grid."""
    idx = np.clip(np.round(np.arange(length) / k).astype(int), 0, stack.shape[0] - 1)
    return stack[idx]
