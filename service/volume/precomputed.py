"""Neuroglancer Precomputed layers through cloud-volume.

All coordinates are absolute voxel coordinates of the layer (the ``voxel_offset`` included), in
engine order ``(z, y, x)``. cloud-volume's ``(x, y, z, channel)`` arrays are converted in
info.py and reader.py (reading) and layers.py (creating, writing) and nowhere else; this module is their
public face.

Frame of an isotropic output layer (odd factor k, h = (k−1)/2): output z voxel ``j = k·i + h``
(absolute) is source section ``i``; z resolution is ``z/k``. The layer starts at the centre of the
first source section and ends at the centre of the last: z offset ``k·offset + h``, z size
``(Z−1)·k + 1``. So no output voxel lies outside the data, and with output chunks of m·k
sections (aligned to the offset) every block covers whole gaps.

Output layers are stored as a :class:`LayerFormat` (raw, png or jpeg; sharded or not) with every
scale down to a chunk-sized top (pyramid.py). Uncertainty layers are ordinary output layers:
create one with :func:`create_uncertainty_layer` (uint8 with its full scale recorded in the
info; float32 for layers of older emrestore) and encode blocks with :func:`encode_uncertainty`.
"""

from __future__ import annotations

from .info import (  # noqa: F401 - the module's public face: reading
    ALLOWED_DTYPES, VolumeInfo, _as_vec3, _fmt_box, _info_exists, _open_cv, _run_io, _volume_info_from_dict,
    open_layer, open_source,
)
from .reader import Cutout, LayerReader, read_zyx  # noqa: F401 - reading boxes (one reader per worker and layer)
from .layers import (  # noqa: F401 - the module's public face: creating layers
    create_output_layer, create_source_layer, create_uncertainty_layer, encode_uncertainty, output_geometry,
)
from .pyramid import LayerFormat, downsample_factors  # noqa: F401 - how layers are stored
from .writing import write_downsampled, write_scales, write_zyx  # noqa: F401 - writing boxes
from .stores import (  # noqa: F401
    PermissionDenied, SourceNotFound, StoreUnreachable, VolumeError, join_url, normalize_url, object_exists,
    translate_store_error,
)

__all__ = [
    "ALLOWED_DTYPES",
    "VolumeError",
    "SourceNotFound",
    "StoreUnreachable",
    "PermissionDenied",
    "VolumeInfo",
    "open_source",
    "open_layer",
    "read_zyx",
    "LayerReader",
    "Cutout",
    "create_source_layer",
    "output_geometry",
    "downsample_factors",
    "create_output_layer",
    "create_uncertainty_layer",
    "encode_uncertainty",
    "write_zyx",
    "write_downsampled",
    "write_scales",
    "LayerFormat",
]
