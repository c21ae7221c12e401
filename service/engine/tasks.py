"""Restoration tasks: how a stack becomes network images, what the network is conditioned on,
the classical estimate it refines, and how its outputs become the restored stack.

Each task is a class; nothing else in the engine branches on the task name.

- ``denoise`` (factor 1): one image per section; conditioning = the section; base = the section.
- ``superres`` (lateral ×2/×4): one image per section; conditioning = its bicubic upsampling.
- ``isotropic`` (z by factor k, CARE-style row filling): the stack is seen as XZ views (one per y)
  and YZ views (one per x). In each view the z axis runs along the image rows; the view is first
  linearly interpolated along z to the output grid, and a second channel marks the rows that are
  real sections. The network fills the other rows; both views are restored and averaged, and real
  sections pass through unchanged. The network is trained on the same geometry cut out of
  full-resolution XY sections (rows removed along y or x, see ``pairs``), so it sees many known
  rows around every gap, not just the two that bound it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .pairs import IsotropicPairs

TASKS = ("denoise", "superres", "isotropic")
SUPERRES_FACTORS = (2, 4)
ISOTROPIC_FACTORS = range(2, 17)


def linear_rows(known: np.ndarray, k: int) -> np.ndarray:
    """Linear interpolation along axis 0 from rows at 0, k, 2k, … to (n−1)·k+1 rows.

    ``known`` is (n, …); returns ((n−1)·k+1, …) float32 with row k·i equal to known[i]."""
    known = np.asarray(known, np.float32)
    n = known.shape[0]
    out = np.empty(((n - 1) * k + 1,) + known.shape[1:], np.float32)
    out[::k] = known
    for j in range(1, k):
        w = j / k
        out[j::k] = (1 - w) * known[:-1] + w * known[1:]
    return out


@dataclass(frozen=True)
class Task:
    """Base: a task name and factor; subclasses own conditioning, base prediction and geometry."""
    name: str
    factor: int = 1

    #: conditioning channels of the network input (besides the noisy sample and the prediction)
    cond_channels = 1
    #: generated channels per image
    out_channels = 1

    # ---------------------------------------------------------------- images
    #: names of the views ``images`` can return (a restore may ask for a subset)
    views = ("xy",)

    def images(self, vol_n: np.ndarray, views: tuple[str, ...] | None = None) -> list[tuple[str, np.ndarray]]:
        """Network conditioning images for a normalised (Z, Y, X) stack: [(view, (N, Cc, H, W))],
        for ``views`` (default: all of ``self.views``)."""
        raise NotImplementedError

    def base(self, cond: torch.Tensor) -> torch.Tensor:
        """The classical estimate the predictor refines: (B, Cc, H, W) → (B, 1, H, W)."""
        return cond[:, :1]

    def known(self, cond: torch.Tensor) -> torch.Tensor | None:
        """Pixels that are measured and pass through unchanged (1) — None when there are none."""
        return None

    def output_sections(self, num_sections: int) -> int:
        """Sections in a restored TIFF stack: (Z − 1)·k + 1 for isotropic, else Z."""
        return num_sections

    def assemble(self, outputs: dict[str, np.ndarray], vol_n: np.ndarray) -> np.ndarray:
        """Network outputs per view, (…, N, H, W) float → the restored (…, Z', Y', X') stack."""
        raise NotImplementedError

    def view_volumes(self, outputs: dict[str, np.ndarray], vol_n: np.ndarray) -> list[np.ndarray]:
        """Each view's outputs as a restored stack (for the spread between views)."""
        return [self.assemble(outputs, vol_n)]

    def output_voxel_size(self, vs):
        return tuple(vs)

    def check_pairs(self, vol: np.ndarray, norm, voxel_size_nm=None, gap: dict | None = None):
        """Pairs with a known answer cut from the input ``vol`` itself (the model's own training
        task on this data) for the needs-fine-tuning check, or None where the input holds no
        reference (denoise: no clean section; superres: no finer scale)."""
        return None

    def to_dict(self) -> dict:
        return {"task": self.name, "factor": self.factor}


@dataclass(frozen=True)
class DenoiseTask(Task):
    def images(self, vol_n, views=None):
        return [("xy", vol_n[:, None])]

    def assemble(self, outputs, vol_n):
        return outputs["xy"]


@dataclass(frozen=True)
class SuperResTask(Task):
    def images(self, vol_n, views=None):
        t = torch.from_numpy(np.ascontiguousarray(vol_n[:, None]))
        up = F.interpolate(t, scale_factor=self.factor, mode="bicubic", align_corners=False)
        return [("xy", up.numpy())]

    def assemble(self, outputs, vol_n):
        return outputs["xy"]

    def output_voxel_size(self, vs):
        return (vs[0] / self.factor, vs[1] / self.factor, vs[2])


@dataclass(frozen=True)
class IsotropicTask(Task):
    cond_channels = 2  # linear interpolation along rows, and the mask of known rows

    def row_conditioning(self, known_rows: np.ndarray) -> np.ndarray:
        """Known rows (n, …, W) at spacing k → conditioning (…, 2, (n−1)k+1, W)."""
        k = self.factor
        interp = linear_rows(known_rows, k)               # (R, …, W)
        mask = np.zeros(interp.shape[0], np.float32)
        mask[::k] = 1.0
        interp = np.moveaxis(interp, 0, -2)               # (…, R, W)
        m = np.broadcast_to(mask[:, None], interp.shape[-2:])
        m = np.broadcast_to(m, interp.shape)
        return np.stack([interp, m], axis=-3).astype(np.float32)

    views = ("xz", "yz")

    def images(self, vol_n, views=None):
        # XZ views (one per y): rows = z, columns = x; YZ views (one per x): rows = z, columns = y
        out = []
        if views is None or "xz" in views:
            out.append(("xz", self.row_conditioning(vol_n)))                            # (Y, 2, R, X)
        if views is None or "yz" in views:
            out.append(("yz", self.row_conditioning(np.transpose(vol_n, (0, 2, 1)))))   # (X, 2, R, Y)
        return out

    def base(self, cond):
        return cond[:, :1]

    def known(self, cond):
        return cond[:, 1:2]

    def output_sections(self, num_sections):
        return (num_sections - 1) * self.factor + 1

    def view_volumes(self, outputs, vol_n):
        """The views present in ``outputs`` (both by default; one when a restore names it)."""
        vols = []
        if "xz" in outputs:
            vols.append(np.moveaxis(outputs["xz"], -3, -2))   # (…, Y, R, X) → (…, R, Y, X)
        if "yz" in outputs:
            vols.append(np.moveaxis(outputs["yz"], -3, -1))   # (…, X, R, Y) → (…, R, Y, X)
        return vols

    def assemble(self, outputs, vol_n):
        vols = self.view_volumes(outputs, vol_n)
        out = sum(vols) / len(vols)
        out[..., ::self.factor, :, :] = vol_n
        return out

    def output_voxel_size(self, vs):
        return (vs[0], vs[1], vs[2] / self.factor)

    def check_pairs(self, vol, norm, voxel_size_nm=None, gap=None):
        """Rows removed inside the input's own XY sections at the learned gap (self-supervised
        training's pairs); None when the sections are too small for the factor."""
        try:
            return IsotropicPairs(self, vol, self_supervised=True, norm=norm, voxel_size_nm=voxel_size_nm,
                                  section_thickness=bool((gap or {}).get("section_thickness")))
        except ValueError:
            return None


_CLASSES = {"denoise": DenoiseTask, "superres": SuperResTask, "isotropic": IsotropicTask}


def make_task(name: str, factor: int = 1) -> Task:
    """The task object for a name and factor; ValueError naming the field when out of range."""
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; choose one of {', '.join(TASKS)}")
    if name == "denoise" and factor != 1:
        raise ValueError(f"factor: denoise takes factor 1, got {factor}")
    if name == "superres" and factor not in SUPERRES_FACTORS:
        raise ValueError(f"factor: superres takes factor 2 or 4, got {factor}")
    if name == "isotropic" and factor not in ISOTROPIC_FACTORS:
        raise ValueError(f"factor: isotropic takes an integer factor in [2, 16], got {factor}")
    return _CLASSES[name](name, int(factor))
