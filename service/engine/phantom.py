"""Synthetic EM-like phantoms with known ground truth, and the degradations used to make
training/benchmark pairs (noise, lateral downsampling, thick serial sections).

Volumes are numpy ``(Z, Y, X)`` float32 in ``[0, 1]``; the phantom is isotropic, so any voxel
size can be assigned to it (e.g. 8 nm in every axis).
"""

from __future__ import annotations

import numbers

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

__all__ = [
    "TASKS",
    "DEFAULT_FACTORS",
    "make_phantom",
    "thick_sections",
    "isotropic_ground_truth",
    "add_poisson_gaussian",
    "blur_downsample",
    "to_uint8",
    "make_pair",
]

TASKS = ("denoise", "superres", "isotropic")
# Factor used by make_pair when none is given (3 is the smallest odd k, see docs/CONTRACTS.md).
DEFAULT_FACTORS = {"denoise": 1, "superres": 2, "isotropic": 3}
SUPERRES_FACTORS = (2, 4)

# Intensity levels of the phantom (before the final imaging blur).
_CYTO_RANGE = (0.60, 0.75)
_MEMBRANE = 0.20
_MITO_MATRIX = 0.38
_MITO_MEMBRANE = 0.16
_CRISTA = 0.16
_VESICLE_RING = 0.22
_PSD = 0.10

# Geometry, in voxels (isotropic).
_CELL_SPACING = 40.0          # mean distance between cell seeds
_CELL_WEIGHT_R = 14.0         # power-diagram weight radius: varies the cell sizes
_WARP_SIGMA = 7.0             # smoothness of the coordinate warp that bends membranes
_WARP_AMPLITUDE = 3.5         # std of the warp displacement
_MEMBRANE_SIGMA = 0.95        # Gaussian profile -> about 2-3 voxels FWHM
_NEIGHBOURS = 6               # candidate seeds per voxel for the power diagram
_CHUNK = 1 << 20              # voxels per k-d tree query


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        dims = tuple(shape)
    except TypeError:
        dims = ()
    if len(dims) != 3 or not all(_is_int(d) and d >= 1 for d in dims):
        raise ValueError(f"shape must be 3 positive ints (Z, Y, X), got {shape!r}")
    return tuple(int(d) for d in dims)


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to zero mean, unit std (float32).

    Wide filters (sigma >= 5) run on a 2× coarser grid and are linearly upsampled.
    """
    f = 2 if sigma >= 5 else 1
    coarse = tuple(-(-s // f) + (1 if f > 1 else 0) for s in shape)
    field = rng.standard_normal(coarse, dtype=np.float32)
    ndi.gaussian_filter(field, sigma / f, output=field, mode="wrap")
    if f > 1:
        field = ndi.zoom(field, f, order=1)[tuple(slice(0, s) for s in shape)]
        field = np.ascontiguousarray(field)
    field -= field.mean()
    std = float(field.std())
    if std > 0:
        field /= std
    return field


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly random 3-D rotation matrix (QR of a Gaussian matrix)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q *= np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _cells(shape, rng):
    """Warped 3-D power diagram: per-voxel cell label and distance to the cell boundary."""
    z, y, x = shape
    pad = 1.5 * _CELL_SPACING
    lo = np.array([-pad, -pad, -pad])
    hi = np.array([z + pad, y + pad, x + pad])
    n_seeds = max(4, int(round(np.prod(hi - lo) / _CELL_SPACING**3)))
    seeds = rng.uniform(lo, hi, size=(n_seeds, 3))
    weights = ((rng.uniform(0.0, 1.0, n_seeds) * _CELL_WEIGHT_R) ** 2).astype(np.float32)
    warp = [_smooth_noise(rng, shape, _WARP_SIGMA) * _WARP_AMPLITUDE for _ in range(3)]

    tree = cKDTree(seeds)
    sep = np.linalg.norm(seeds[:, None, :] - seeds[None, :, :], axis=2)
    np.fill_diagonal(sep, 1.0)
    half_sep_flat = (0.5 / sep).astype(np.float32).ravel()  # 1 / (2 |s_i - s_j|)
    k = min(_NEIGHBOURS, n_seeds)
    labels = np.empty(z * y * x, dtype=np.int32)
    dist = np.empty(z * y * x, dtype=np.float32)
    warp_flat = [w.reshape(-1) for w in warp]
    plane = y * x
    planes_per_chunk = max(1, _CHUNK // plane)
    yy, xx = np.meshgrid(np.arange(y, dtype=np.float32), np.arange(x, dtype=np.float32), indexing="ij")
    for z0 in range(0, z, planes_per_chunk):
        z1 = min(z, z0 + planes_per_chunk)
        sl = slice(z0 * plane, z1 * plane)
        nz = z1 - z0
        pts = np.empty((nz * plane, 3), dtype=np.float64)
        pts[:, 0] = np.repeat(np.arange(z0, z1, dtype=np.float64), plane) + warp_flat[0][sl]
        pts[:, 1] = np.tile(yy.reshape(-1), nz) + warp_flat[1][sl]
        pts[:, 2] = np.tile(xx.reshape(-1), nz) + warp_flat[2][sl]
        d, idx = tree.query(pts, k=k, workers=-1)
        d = d.astype(np.float32)
        power = d * d - weights[idx]
        order = np.argmin(power, axis=1)
        rows = np.arange(len(pts))
        best = idx[rows, order]
        p_best = power[rows, order]
        # Distance to the power bisector of (best, j) is (p_j - p_best) / (2 |s_best - s_j|);
        # the distance to the cell boundary is the minimum over the other candidates.
        half_sep = np.take(half_sep_flat, best[:, None] * n_seeds + idx)
        h = (power - p_best[:, None]) * half_sep
        h[rows, order] = np.inf
        labels[sl] = best
        dist[sl] = np.min(h, axis=1)
    return labels.reshape(shape), dist.reshape(shape), n_seeds


def _box(center, radius, shape):
    """Slices of the clipped bounding box of a sphere, or None if it misses the volume."""
    lo = np.floor(np.asarray(center) - radius).astype(int)
    hi = np.ceil(np.asarray(center) + radius).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _box_coords(box):
    return np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in box], indexing="ij")


def _blend(vol, box, alpha, value):
    """vol[box] <- vol[box]·(1−alpha) + value·alpha."""
    sub = vol[box]
    sub += alpha * (value - sub)


def _sample_points(rng, shape, dist, n, lo, hi, tries=40):
    """Random voxel positions whose boundary distance lies in [lo, hi)."""
    cand = (rng.uniform(0, 1, size=(n * tries, 3)) * np.array(shape)).astype(int)
    d = dist[cand[:, 0], cand[:, 1], cand[:, 2]]
    ok = cand[(d >= lo) & (d < hi)]
    return ok[:n].astype(np.float64) + rng.uniform(0, 1, size=(min(n, len(ok)), 3))


def _mitochondria(vol, labels, dist, rng):
    shape = vol.shape
    n = int(round(vol.size * 0.035 / 3000.0))
    if n == 0 and rng.uniform() < vol.size * 0.035 / 3000.0:
        n = 1
    centers = _sample_points(rng, shape, dist, n, 8.0, np.inf)
    for c in centers:
        a = rng.uniform(12.0, 26.0)
        b = rng.uniform(5.5, 9.0)
        cc = b * rng.uniform(0.8, 1.1)
        semi = np.array([a, b, cc], dtype=np.float32)
        box = _box(c, a + 2.5, shape)
        if box is None:
            continue
        rot = _random_rotation(rng).astype(np.float32)
        gz, gy, gx = _box_coords(box)
        rel = np.stack([gz - c[0], gy - c[1], gx - c[2]], axis=-1)
        u = rel @ rot  # coordinates along the ellipsoid's axes
        q = u / semi
        r = np.sqrt(np.sum(q * q, axis=-1)) + 1e-6
        grad = np.sqrt(np.sum((u / semi**2) ** 2, axis=-1)) / r + 1e-6
        sd = (r - 1.0) / grad  # approximate signed distance to the surface (<0 inside)
        inside_cell = (labels[box] == labels[tuple(int(v) for v in c)]) & (dist[box] > 1.2)
        cell = inside_cell.astype(np.float32)
        # Matrix, then the double membrane (outer at sd=0, inner at sd=-1.8), then cristae.
        body = np.clip(0.5 - sd, 0.0, 1.0) * cell
        _blend(vol, box, body, _MITO_MATRIX)
        outer = np.exp(-0.5 * (sd / 0.55) ** 2)
        inner = np.exp(-0.5 * ((sd + 1.8) / 0.55) ** 2)
        _blend(vol, box, np.maximum(outer, inner) * cell, _MITO_MEMBRANE)
        period = rng.uniform(4.5, 6.0)
        phase = rng.uniform(0, 2 * np.pi, size=3)
        wobble = 1.2 * np.sin(u[..., 1] / 2.7 + phase[1]) + 1.0 * np.sin(u[..., 2] / 3.1 + phase[2])
        stripes = np.cos(2 * np.pi * (u[..., 0] + wobble) / period + phase[0])
        stripes = np.clip(stripes, 0.0, 1.0) ** 4
        crista = stripes * np.clip((-sd - 2.6) / 0.8, 0.0, 1.0) * cell
        _blend(vol, box, 0.9 * crista, _CRISTA)


def _vesicle_clusters(vol, labels, dist, rng):
    shape = vol.shape
    expected = vol.size / 180_000.0
    n = int(expected) + int(rng.uniform() < expected - int(expected))
    centers = _sample_points(rng, shape, dist, n, 8.0, 16.0)
    for c in centers:
        cell_id = labels[tuple(int(v) for v in c)]
        radius = rng.uniform(10.0, 15.0)
        want = int(rng.integers(40, 100))
        direction = rng.normal(size=(want * 12, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        rad_pos = np.sort(radius * rng.uniform(0, 1, size=len(direction)) ** (1 / 3))
        cand = c + direction * rad_pos[:, None]  # nearest the centre first: a dense core
        radii_c = rng.uniform(2.2, 3.6, size=len(cand))
        # Candidates inside the same cell and clear of its membrane, then greedy packing.
        ip = np.round(cand).astype(int)
        ok = np.all((ip >= 0) & (ip < np.array(shape)), axis=1)
        cand, radii_c, ip = cand[ok], radii_c[ok], ip[ok]
        at = (ip[:, 0], ip[:, 1], ip[:, 2])
        ok = (labels[at] == cell_id) & (dist[at] >= radii_c + 1.2)
        cand, radii_c = cand[ok], radii_c[ok]
        kept = np.empty((0, 3))
        radii = np.empty(0)
        for p, rad in zip(cand, radii_c):
            if len(kept) and np.min(np.sqrt(np.sum((kept - p) ** 2, axis=1)) - radii) < rad + 0.4:
                continue
            kept = np.vstack([kept, p])
            radii = np.append(radii, rad)
            if len(kept) >= want:
                break
        if not len(kept):
            continue
        radii = radii.astype(np.float32)
        # Postsynaptic-density-like dark thickening of the nearby membrane.
        h_c = float(dist[tuple(int(v) for v in c)])
        reach = h_c + 6.0
        box = _box(c, reach + 2, shape)
        if box is not None:
            gz, gy, gx = _box_coords(box)
            rc = np.sqrt((gz - c[0]) ** 2 + (gy - c[1]) ** 2 + (gx - c[2]) ** 2)
            near = np.clip(reach - rc, 0.0, 1.0)
            psd = 0.8 * near * np.exp(-0.5 * (dist[box] / 1.6) ** 2)
            _blend(vol, box, psd, _PSD)
        # Vesicles: dark shells, i.e. rings in any plane that cuts them.
        rmax = float(np.max(np.linalg.norm(kept - c, axis=1) + radii)) + 1.5
        box = _box(c, rmax, shape)
        if box is None:
            continue
        gz, gy, gx = _box_coords(box)
        pts = np.stack([gz.ravel(), gy.ravel(), gx.ravel()], axis=1)
        dv, iv = cKDTree(kept).query(pts, k=1)
        shell = np.abs(dv - radii[iv]).reshape(gz.shape).astype(np.float32)
        ring = np.exp(-0.5 * (shell / 0.6) ** 2)
        _blend(vol, box, 0.9 * ring, _VESICLE_RING)


def make_phantom(shape=(64, 256, 256), seed: int = 0) -> np.ndarray:
    """Isotropic EM-like volume (Z, Y, X), float32 in [0, 1], deterministic for a seed.

    Bright textured cytoplasm in cells of a warped 3-D power diagram, dark membranes
    (2–3 voxels), mitochondria (randomly oriented ellipsoids with a double membrane and
    cristae), vesicle clusters (shells of 4–7 voxels diameter) next to dark synaptic
    membrane patches, fine texture, and a slight imaging blur.
    """
    shape = _check_shape(shape)
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    rng = np.random.default_rng(seed)

    labels, dist, n_cells = _cells(shape, rng)

    base = rng.uniform(*_CYTO_RANGE, size=n_cells).astype(np.float32)
    vol = base[labels]
    vol += 0.03 * _smooth_noise(rng, shape, 6.0)
    fine = _smooth_noise(rng, shape, 0.8) - 0.6 * _smooth_noise(rng, shape, 1.6)
    vol += 0.05 * fine
    # Sparse small dark puncta (cytoskeleton / ER cross-sections).
    puncta = _smooth_noise(rng, shape, 1.0)
    vol -= 0.15 * np.clip(puncta - 1.9, 0.0, None)

    membrane = np.exp(-0.5 * (dist / _MEMBRANE_SIGMA) ** 2).astype(np.float32)
    vol += membrane * (_MEMBRANE - vol)

    _mitochondria(vol, labels, dist, rng)
    _vesicle_clusters(vol, labels, dist, rng)

    ndi.gaussian_filter(vol, 0.6, output=vol)
    np.clip(vol, 0.0, 1.0, out=vol)
    return vol


def _check_k(k) -> int:
    if not _is_int(k) or k < 2:
        raise ValueError(f"k (section thickness factor) must be an int >= 2, got {k!r}")
    return int(k)


def _check_volume(vol, name="vol") -> np.ndarray:
    vol = np.asarray(vol)
    if vol.ndim != 3 or vol.size == 0:
        raise ValueError(f"{name} must be a non-empty 3-D (Z, Y, X) array, got shape {vol.shape}")
    return vol


def thick_sections(vol, k: int, mode: str = "average") -> np.ndarray:
    """Simulate serial sections k voxels thick from an isotropic volume (Z, Y, X).

    Section i is centred on plane k·i; there are Zs = (Z−1)//k + 1 sections.
    mode "sample": section i = vol[k·i] (same dtype).
    mode "average": mean of planes k·i−(k−1)//2 … k·i+k//2, clipped to the volume (float32);
    for even k this window is centred half a voxel after k·i.
    The ground truth for restoring the sections by factor k is vol[:(Zs−1)·k+1]
    (see isotropic_ground_truth).
    """
    vol = _check_volume(vol)
    k = _check_k(k)
    if mode not in ("average", "sample"):
        raise ValueError(f"mode must be 'average' or 'sample', got {mode!r}")
    z = vol.shape[0]
    zs = (z - 1) // k + 1
    if mode == "sample":
        return vol[::k][:zs].copy()
    out = np.empty((zs,) + vol.shape[1:], dtype=np.float32)
    for i in range(zs):
        lo = max(k * i - (k - 1) // 2, 0)
        hi = min(k * i + k // 2, z - 1)
        out[i] = np.mean(vol[lo : hi + 1], axis=0, dtype=np.float64)
    return out


def isotropic_ground_truth(vol, k: int) -> np.ndarray:
    """vol[:(Zs−1)·k+1]: the planes that restoring thick_sections(vol, k) by k should give."""
    vol = _check_volume(vol)
    k = _check_k(k)
    zs = (vol.shape[0] - 1) // k + 1
    return vol[: (zs - 1) * k + 1]


def _check_unit_range(img, name="img") -> np.ndarray:
    img = np.asarray(img, dtype=np.float32)
    if img.size == 0:
        raise ValueError(f"{name} must be non-empty")
    if not np.all(np.isfinite(img)):
        raise ValueError(f"{name} must be finite")
    lo, hi = float(img.min()), float(img.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"{name} values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return img


def add_poisson_gaussian(img, photons: float = 20.0, read_sigma: float = 0.02, seed=0) -> np.ndarray:
    """Poisson shot noise (img·photons counts) plus Gaussian read noise, clipped to [0, 1].

    img: values in [0, 1]; photons: counts at intensity 1 (> 0); read_sigma: std in
    intensity units (>= 0); seed: int or numpy Generator. Returns float32.
    """
    img = _check_unit_range(img)
    if not np.isfinite(photons) or photons <= 0:
        raise ValueError(f"photons must be a finite number > 0, got {photons!r}")
    if not np.isfinite(read_sigma) or read_sigma < 0:
        raise ValueError(f"read_sigma must be a finite number >= 0, got {read_sigma!r}")
    rng = np.random.default_rng(seed)
    counts = rng.poisson(np.clip(img, 0.0, 1.0).astype(np.float64) * photons)
    noisy = counts / photons
    if read_sigma > 0:
        noisy = noisy + rng.normal(0.0, read_sigma, size=img.shape)
    return np.clip(noisy, 0.0, 1.0).astype(np.float32)


def blur_downsample(img, factor: int, axes=(-2, -1)) -> np.ndarray:
    """Gaussian anti-alias blur (sigma 0.5·factor) then factor×factor area averaging along axes.

    Each axis size must be divisible by factor. factor 1 returns a float32 copy. Returns float32.
    """
    img = np.asarray(img)
    if img.size == 0:
        raise ValueError("img must be non-empty")
    if not _is_int(factor) or factor < 1:
        raise ValueError(f"factor must be an int >= 1, got {factor!r}")
    try:
        axes = tuple(axes)
    except TypeError:
        axes = (axes,)
    norm = []
    for ax in axes:
        if not _is_int(ax) or not -img.ndim <= ax < img.ndim:
            raise ValueError(f"axes entry {ax!r} is not an axis of an array with {img.ndim} dims")
        norm.append(int(ax) % img.ndim)
    if len(set(norm)) != len(norm):
        raise ValueError(f"axes must be distinct, got {axes!r}")
    for ax, a in zip(axes, norm):
        if img.shape[a] % factor:
            raise ValueError(
                f"axis {ax} has size {img.shape[a]}, which is not divisible by factor {factor}"
            )
    out = img.astype(np.float32, copy=True)
    if factor == 1:
        return out
    sigma = [0.0] * img.ndim
    for a in norm:
        sigma[a] = 0.5 * factor
    ndi.gaussian_filter(out, sigma, output=out, mode="reflect")
    for a in sorted(norm):
        shp = out.shape
        out = out.reshape(shp[:a] + (shp[a] // factor, factor) + shp[a + 1 :]).mean(axis=a + 1)
    return out.astype(np.float32, copy=False)


def to_uint8(vol) -> np.ndarray:
    """Map [0, 1] floats to uint8 0–255 (values outside are clipped, NaN rejected)."""
    vol = np.asarray(vol, dtype=np.float64)
    if not np.all(np.isfinite(vol)):
        raise ValueError("vol must be finite to convert to uint8")
    return np.round(np.clip(vol, 0.0, 1.0) * 255.0).astype(np.uint8)


def make_pair(task: str, clean, factor: int | None = None, seed=0, *,
              photons: float = 20.0, read_sigma: float = 0.02):
    """(low_quality, high_quality) training/benchmark pair from a clean [0, 1] array.

    denoise (factor None or 1): (add_poisson_gaussian(clean), clean).
    superres (factor 2 or 4; default 2): clean is cropped so its last two axes are multiples
    of factor; returns (blur_downsample(cropped, factor), cropped).
    isotropic (factor int >= 2; default 3): clean must be (Z, Y, X) with Z > factor;
    returns (thick_sections(clean, k), clean[:(Zs−1)·k+1]).
    seed (int or numpy Generator) and photons/read_sigma only affect denoise.
    All outputs are float32.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if factor is None:
        factor = DEFAULT_FACTORS[task]
    clean = _check_unit_range(clean, "clean")
    if task == "denoise":
        if factor != 1:
            raise ValueError(f"factor for task 'denoise' must be None or 1, got {factor!r}")
        return add_poisson_gaussian(clean, photons, read_sigma, seed), clean.copy()
    if task == "superres":
        if not _is_int(factor) or factor not in SUPERRES_FACTORS:
            raise ValueError(
                f"factor for task 'superres' must be one of {SUPERRES_FACTORS}, got {factor!r}"
            )
        if clean.ndim < 2:
            raise ValueError(f"clean must have at least 2 dims for superres, got shape {clean.shape}")
        h = clean.shape[-2] - clean.shape[-2] % factor
        w = clean.shape[-1] - clean.shape[-1] % factor
        if h == 0 or w == 0:
            raise ValueError(f"clean last two axes {clean.shape[-2:]} must be >= factor {factor}")
        high = clean[..., :h, :w].copy()
        return blur_downsample(high, factor), high
    # isotropic
    if not _is_int(factor) or factor < 2:
        raise ValueError(f"factor for task 'isotropic' must be an int >= 2, got {factor!r}")
    clean = _check_volume(clean, "clean")
    if clean.shape[0] <= factor:
        raise ValueError(
            f"clean has {clean.shape[0]} planes along z; isotropic factor {factor} needs at least {factor + 1}"
        )
    return thick_sections(clean, factor), isotropic_ground_truth(clean, factor).copy()
