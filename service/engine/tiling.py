"""Seamless tiled evaluation of the network over images larger than a patch.

Tiles overlap and are blended with a smooth (raised-cosine) window. The blending happens at every
denoising step on the network's prediction (not on finished tiles), so the whole image is one
sample: neighbouring tiles agree in their overlap and no seams appear. Intensity normalisation is
never done here (it comes from whole-volume statistics, see ``normalize``).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .cpu_runtime import channels_last


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap``."""
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"overlap: must be in [0, tile) with tile > 0, got tile={tile}, overlap={overlap}")
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return sorted(set(starts))


def blend_window(tile: int, overlap: int) -> np.ndarray:
    """1-D window: raised-cosine ramps of ``overlap`` pixels at both ends, 1 inside, never 0."""
    w = np.ones(tile, dtype=np.float64)
    if overlap > 0:
        i = np.arange(overlap)
        ramp = np.sin(0.5 * np.pi * (i + 0.5) / overlap) ** 2
        w[:overlap] = ramp
        w[-overlap:] = np.minimum(w[-overlap:], ramp[::-1])
    return w


def _pad_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    ph, pw = h - x.shape[-2], w - x.shape[-1]
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


class TiledDenoiser:
    """Evaluate ``net(cat([x, cond]), gamma)`` over overlapping tiles and blend the outputs.

    ``cond`` is (N, Cc, H, W); the sample batch ``x`` is (N·K, C, H, W), sample k of image n at
    index n·K + k. ``multiple`` is the network's required size multiple.
    """

    def __init__(self, net: Callable, cond: torch.Tensor, samples: int, tile: int = 256,
                 overlap: int = 32, max_batch: int = 8, multiple: int = 8,
                 autocast_dtype: torch.dtype | None = None):
        self.net = net
        self.cond = cond
        self.samples = samples
        self.max_batch = max(1, int(max_batch))
        self.autocast_dtype = autocast_dtype
        self.evaluations = 0  # network evaluations over the whole image (one per denoising step)
        H, W = cond.shape[-2:]
        self.H, self.W = H, W
        th = min(tile, H)
        tw = min(tile, W)
        # tile size actually evaluated: a multiple of the network's factor
        self.th = int(math.ceil(th / multiple) * multiple)
        self.tw = int(math.ceil(tw / multiple) * multiple)
        ov_h = min(overlap, max(th - 1, 0))
        ov_w = min(overlap, max(tw - 1, 0))
        self.ys = tile_starts(H, th, ov_h)
        self.xs = tile_starts(W, tw, ov_w)
        self.th_crop, self.tw_crop = th, tw
        wy = blend_window(th, ov_h if len(self.ys) > 1 else 0)
        wx = blend_window(tw, ov_w if len(self.xs) > 1 else 0)
        self.window = torch.from_numpy(np.outer(wy, wx)).float().to(cond.device)
        norm = torch.zeros(H, W, device=cond.device)
        for y in self.ys:
            for x in self.xs:
                norm[y:y + th, x:x + tw] += self.window
        self.norm = norm

    @property
    def num_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    def __call__(self, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        self.evaluations += 1
        K = self.samples
        th, tw = self.th_crop, self.tw_crop
        out = None
        crops = []  # (b, y, x)
        for b in range(x.shape[0]):
            for y in self.ys:
                for xx in self.xs:
                    crops.append((b, y, xx))
        for i in range(0, len(crops), self.max_batch):
            chunk = crops[i:i + self.max_batch]
            xin = torch.stack([
                torch.cat([x[b, :, y:y + th, xx:xx + tw], self.cond[b // K, :, y:y + th, xx:xx + tw]], 0)
                for b, y, xx in chunk])
            xin = channels_last(_pad_to(xin, self.th, self.tw))
            g = torch.stack([gamma[b] for b, _, _ in chunk])
            if self.autocast_dtype is not None:
                with torch.autocast(device_type=xin.device.type, dtype=self.autocast_dtype):
                    pred = self.net(xin, g)
            else:
                pred = self.net(xin, g)
            pred = pred.float()[..., :th, :tw]
            if out is None:
                out = torch.zeros((x.shape[0], pred.shape[1], self.H, self.W), device=x.device)
            for j, (b, y, xx) in enumerate(chunk):
                out[b, :, y:y + th, xx:xx + tw] += pred[j] * self.window
        return out / self.norm


def auto_max_batch(tile: int, device: torch.device | str, preset_width: int = 32,
                   budget_bytes: int | None = None) -> int:
    """Tiles per network call that fit in memory: CUDA free memory, or a CPU budget of 2 GiB."""
    dev = torch.device(device)
    if budget_bytes is None:
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            budget_bytes = int(free * 0.5)
        else:
            budget_bytes = 2 * 1024 ** 3
    # activations kept by a UNet forward pass (inference): ~ 40 feature maps of width·tile² floats
    per_tile = 40 * preset_width * tile * tile * 4
    return int(max(1, min(64, budget_bytes // per_tile)))
