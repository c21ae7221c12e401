"""Noise-conditioned UNet for conditional diffusion on EM images.

The network sees the noisy target concatenated with the conditioning images along channels and is
conditioned (FiLM) on the continuous noise level ``gamma = sqrt(alpha_bar)``, so inference may use
any schedule. What its output means is the diffusion's choice (diffusion.py: v by default, or the
noise ε as in the reference). With ``noise_conditioned=False`` the same body is a plain
regression UNet: the predictor, and the CARE-style baseline of the benchmarks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
import torch.nn.functional as F


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int
    out_channels: int
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    attention_at_bottleneck: bool = True
    dropout: float = 0.2
    noise_conditioned: bool = True
    #: a second head predicting the log-variance of the output's error per pixel, from the
    #: detached features (appended as the last output channel)
    error_head: bool = False

    @property
    def downsample_factor(self) -> int:
        """Spatial sizes must be multiples of this."""
        return 2 ** (len(self.channel_mults) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        d = dict(d)
        d["channel_mults"] = tuple(d["channel_mults"])
        return cls(**d)


#: Presets. ``base`` is the EMDiffuse size (32 channels, 1-2-4-8, 2 res blocks, bottleneck
#: attention, dropout 0.2); ``tiny`` trains on a CPU in minutes (tests, demo).
PRESETS: dict[str, dict] = {
    "tiny": dict(base_channels=16, channel_mults=(1, 2, 4), num_res_blocks=1,
                 attention_at_bottleneck=False, dropout=0.0),
    "small": dict(base_channels=32, channel_mults=(1, 2, 4), num_res_blocks=1,
                  attention_at_bottleneck=True, dropout=0.0),
    "base": dict(base_channels=32, channel_mults=(1, 2, 4, 8), num_res_blocks=2,
                 attention_at_bottleneck=True, dropout=0.2),
}


def preset_config(preset: str, in_channels: int, out_channels: int, **overrides) -> UNetConfig:
    if preset not in PRESETS:
        raise ValueError(f"preset: unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    kw = dict(PRESETS[preset])
    kw.update(overrides)
    return UNetConfig(in_channels=in_channels, out_channels=out_channels, **kw)


def _groups(ch: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if ch % g == 0 and ch // g >= 2:
            return g
    return 1


class NoiseLevelEmbedding(nn.Module):
    """Sinusoidal encoding of the continuous noise level followed by an MLP (SR3-style)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 4), nn.SiLU(), nn.Linear(dim * 4, dim * 4))

    def forward(self, gamma: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=gamma.device,
                                                             dtype=torch.float32) / half)
        arg = 1000.0 * gamma.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([arg.sin(), arg.cos()], dim=1))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int | None, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout) if emb_dim else None
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.norm2(h)
        if self.film is not None and emb is not None:
            scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
            h = h * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    def __init__(self, ch: int, heads: int = 4):
        super().__init__()
        self.heads = heads if ch % heads == 0 else 1
        self.norm = nn.GroupNorm(_groups(ch), ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        o = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(o.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        ch0 = c.base_channels
        emb_dim = ch0 * 4 if c.noise_conditioned else None
        self.embed = NoiseLevelEmbedding(ch0) if c.noise_conditioned else None
        self.inp = nn.Conv2d(c.in_channels, ch0, 3, padding=1)
        chans = [ch0 * m for m in c.channel_mults]
        self.down = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skips = [ch0]
        cur = ch0
        for level, ch in enumerate(chans):
            blocks = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(cur, ch, emb_dim, c.dropout))
                cur = ch
                skips.append(cur)
            self.down.append(blocks)
            if level < len(chans) - 1:
                self.downsamplers.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
        self.mid1 = ResBlock(cur, cur, emb_dim, c.dropout)
        self.mid_attn = SelfAttention(cur) if c.attention_at_bottleneck else nn.Identity()
        self.mid2 = ResBlock(cur, cur, emb_dim, c.dropout)
        self.up = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level, ch in reversed(list(enumerate(chans))):
            blocks = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResBlock(cur + skips.pop(), ch, emb_dim, c.dropout))
                cur = ch
            self.up.append(blocks)
            if level > 0:
                self.upsamplers.append(nn.Conv2d(cur, cur, 3, padding=1))
        self.out = nn.Sequential(nn.GroupNorm(_groups(cur), cur), nn.SiLU(),
                                 nn.Conv2d(cur, c.out_channels, 3, padding=1))
        self.error_head = None
        if c.error_head:
            self.error_head = nn.Sequential(nn.GroupNorm(_groups(cur), cur), nn.SiLU(),
                                            nn.Conv2d(cur, cur, 3, padding=1), nn.SiLU(),
                                            nn.Conv2d(cur, 1, 3, padding=1))
            nn.init.zeros_(self.error_head[-1].weight)

    def forward(self, x: torch.Tensor, gamma: torch.Tensor | None = None) -> torch.Tensor:
        """(N, out_channels [+ 1 with the error head], H, W). The error head sees the features
        detached: its loss trains only the head, so learning the error costs the mean nothing."""
        f = self.config.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"input: spatial size {tuple(x.shape[-2:])} must be a multiple of {f}")
        emb = self.embed(gamma) if self.embed is not None else None
        h = self.inp(x)
        hs = [h]
        for level, blocks in enumerate(self.down):
            for blk in blocks:
                h = blk(h, emb)
                hs.append(h)
            if level < len(self.downsamplers):
                h = self.downsamplers[level](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for i, blocks in enumerate(self.up):
            for blk in blocks:
                h = blk(torch.cat([h, hs.pop()], dim=1), emb)
            if i < len(self.upsamplers):
                h = self.upsamplers[i](F.interpolate(h, scale_factor=2, mode="nearest"))
        if self.error_head is not None:
            return torch.cat([self.out(h), self.error_head(h.detach())], 1)
        return self.out(h)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
