"""Missing tissue inside a block: which output voxels have a source, and what the network sees
where the source has none.

A chunk that was never written is missing tissue (outside the sample, a lost section), not a
black region: uint8 0 is valid data, so the reader reports which voxels are missing
(``Cutout.present``) and the worker

- writes **0 — the value every Precomputed reader shows for an absent chunk — over every output
  voxel that depends on a missing source voxel** (the output's "no data"; the uncertainty layer
  holds 0 there too): for denoise and super-resolution the voxel itself; for isotropic z, both
  source sections around the output voxel, so restoration never bridges a missing section (a lost
  section leaves a gap of 2k−1 empty output sections instead of an invented one);
- shows the network the **nearest present voxel** (in nm, so a neighbouring section at 50 nm
  is further than a neighbouring pixel at 8 nm) where the source is missing, so that the absent
  region does not pull the restored tissue next to it towards 0;
- skips a block with no output voxel left (marked done, nothing written).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .blocks import Block, assemble_isotropic, crop_to_write_box

__all__ = ["output_present", "fill_from_nearest"]


def output_present(present: np.ndarray, block: Block, scale_xyz: Sequence[int]) -> np.ndarray:
    """Boolean mask over the block's write box: True where every source voxel the output voxel
    is restored from exists. ``present`` covers the block's read box (zyx)."""
    fx, _, k = (int(v) for v in scale_xyz)
    present = np.asarray(present, dtype=bool)
    if k > 1:
        z = present.shape[0]
        rows = np.arange((z - 1) * k + 1)
        stack = present[rows // k] & present[-(-rows // k)]  # both bounding sections present
        return assemble_isotropic(stack, block.read.start[0], block, k)
    if fx > 1:
        present = np.repeat(np.repeat(present, fx, axis=1), fx, axis=2)
    return crop_to_write_box(present, block, (fx, fx, 1))


def fill_from_nearest(data: np.ndarray, present: np.ndarray, voxel_nm_zyx: Sequence[float]) -> np.ndarray:
    """``data`` with each missing voxel replaced by the nearest present one (physical distance);
    ``data`` unchanged when nothing is present."""
    from scipy import ndimage

    present = np.asarray(present, dtype=bool)
    if present.all() or not present.any():
        return data
    idx = ndimage.distance_transform_edt(~present, sampling=tuple(float(v) for v in voxel_nm_zyx),
                                         return_distances=False, return_indices=True)
    return np.asarray(data)[tuple(idx)]
