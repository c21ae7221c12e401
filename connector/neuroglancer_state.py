"""Neuroglancer states: the layers, shaders and boxes that show a restored region.

:func:`viewer_state` builds a typed ``neuroglancer.ViewerState`` (the Python package's own
state classes, as the interactive viewer uses them) showing a source, a restored and an
uncertainty layer; :func:`state_for_layers`, :func:`write_state` and :func:`state_link` give its
JSON, a state file or a link (used by the demo and by the ``neuroglancer`` register target,
:func:`register_state_target`). The restored layer is
grey with the source's contrast (:func:`contrast_from_source`) and transparent where nothing was
written (:func:`restored_shader`); the uncertainty layer is an orange overlay whose alpha is the
value (:func:`uncertainty_shader`); the region actually written (:func:`restored_box`) is a box
in the ``restored regions`` annotation layer. The interactive viewer
(:mod:`connector.neuroglancer_view`) uses the same shaders and boxes.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from typing import Any, Sequence

from .util import ConnectorError, public_url, read_json_url, write_json_url

log = logging.getLogger(__name__)

__all__ = ["viewer_state", "state_for_layers", "write_state", "state_link", "register_state_target",
           "UNCERTAINTY_SHADER", "RESULT_LAYER", "DEFAULT_NG_LINK_PREFIX", "restored_shader", "uncertainty_shader", "restored_box",
           "box_to_units", "contrast_from_source"]

DEFAULT_NG_LINK_PREFIX = "https://neuroglancer-demo.appspot.com"

RESULT_LAYER = "restored regions"


def restored_shader(lo: float, hi: float) -> str:
    """Restored data in grey with the source's contrast (``lo``..``hi``); voxels with value 0 —
    chunks that were not written read as 0 — are transparent, so the source shows through
    everywhere outside the restored region."""
    return (f"#uicontrol invlerp normalized(range=[{lo:g}, {hi:g}])\n"
            "void main() {\n"
            "  if (toNormalized(getDataValue()) == 0.0) {\n"
            "    emitTransparent();\n"
            "  } else {\n"
            "    emitGrayscale(normalized());\n"
            "  }\n"
            "}\n")


def uncertainty_shader(hi: float) -> str:
    """An orange overlay whose alpha is the uncertainty (0 → fully transparent, ``hi`` → opaque)."""
    return (f"#uicontrol invlerp normalized(range=[0, {hi:g}])\n"
            "#uicontrol vec3 color color(default=\"#ff5a00\")\n"
            "void main() {\n"
            "  emitRGBA(vec4(color, clamp(normalized(), 0.0, 1.0)));\n"
            "}\n")


UNCERTAINTY_SHADER = uncertainty_shader(1.0)


def contrast_from_source(url: str, geom: dict | None = None, max_xy: int = 256) -> tuple[float, float]:
    """(1st, 99.5th) percentile of the non-zero voxels of a central block of the coarsest scale
    of ``url``: the default contrast for restored data. Falls back to the dtype's range."""
    import numpy as np
    from service.volume import precomputed as pc

    g = geom
    try:
        if g is None:
            from .util import layer_geometry
            g = layer_geometry(url)
        mip = max(0, int(g.get("num_scales", 1)) - 1)
        info = pc.open_layer(url, mip, "source")
        off, size = list(info.voxel_offset_xyz), list(info.size_xyz)
        c = [o + n // 2 for o, n in zip(off, size)]
        half = [min(max_xy, n) // 2 for n in size[:2]] + [min(2, size[2] // 2)]
        start = [max(o, ci - h) for o, ci, h in zip(off, c, half)]
        stop = [min(o + n, ci + max(h, 1)) for o, n, ci, h in zip(off, size, c, half)]
        a = pc.read_zyx(url, start[::-1], stop[::-1], mip, fill_missing=True)
        v = a[a != 0]
        if v.size:
            lo, hi = (float(x) for x in np.percentile(v, [1.0, 99.5]))
            if hi > lo:
                return lo, hi
    except Exception as e:  # noqa: BLE001 - a default contrast is a nicety
        log.info("contrast from %s: %s", url, e)
    dtype = (g or {}).get("dtype", "uint8")
    return (0.0, 255.0) if dtype == "uint8" else (0.0, 65535.0) if dtype == "uint16" else (0.0, 1.0)


def restored_box(output_url: str) -> tuple[list[int], list[int]] | None:
    """The region actually written to ``output_url`` (mip 0, output voxels, stop exclusive): the
    union of its chunk files, or of its shard files (a sharded layer). None when nothing is
    written yet or the store cannot be listed."""
    import re as _re

    from service.volume.sharding import shard_box_of

    from .util import layer_geometry, local_path
    try:
        g = layer_geometry(output_url)
        key = g["scale_keys"][0] if g.get("scale_keys") else None
        if not key:
            return None
        local = local_path(output_url)
        if local is not None:
            names = os.listdir(os.path.join(local, key))
        else:
            from cloudfiles import CloudFiles
            names = [n.rsplit("/", 1)[-1] for n in CloudFiles(output_url.rstrip("/") + "/" + key).list()]
        sharding = g.get("sharding")
    except Exception:  # noqa: BLE001
        return None
    lo, hi = None, None
    for n in names:
        m = _re.match(r"^(\d+)-(\d+)_(\d+)-(\d+)_(\d+)-(\d+)(\.gz|\.br)?$", n)
        box = shard_box_of(sharding, n, g["size_xyz"], g["chunk_size_xyz"], g["voxel_offset_xyz"]) if sharding else None
        if not m and box is None:
            continue
        if box is not None:
            a, b = list(box[0]), list(box[1])
        else:
            v = [int(x) for x in m.groups()[:6]]
            a, b = [v[0], v[2], v[4]], [v[1], v[3], v[5]]
        lo = a if lo is None else [min(x, y) for x, y in zip(lo, a)]
        hi = b if hi is None else [max(x, y) for x, y in zip(hi, b)]
    return (lo, hi) if lo is not None else None


def box_to_units(box_out, out_res, units_res) -> tuple[list[float], list[float]]:
    """A box in output voxels (resolution ``out_res`` nm) in the units of another resolution."""
    s, e = box_out
    return ([a * r / u for a, r, u in zip(s, out_res, units_res)], [b * r / u for b, r, u in zip(e, out_res, units_res)])



# ----------------------------------------------------------------------------- state files / links
def _ng_source(url: str, prefix_map: Any = None) -> str:
    return "precomputed://" + public_url(url, prefix_map)


def _meters(resolution_nm_xyz: Sequence[float]):
    """A Neuroglancer coordinate space x, y, z in metres (``[8e-09, "m"]``, rounded to 12 digits)."""
    import neuroglancer
    return neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="m",
                                        scales=[float(f"{float(r) * 1e-9:.12g}") for r in resolution_nm_xyz])


def viewer_state(source: str | None, restored: str | None = None, uncertainty: str | None = None,
                 *, prefix_map: Any = None, names: dict | None = None,
                 position_xyz: Sequence[float] | None = None,
                 resolution_nm_xyz: Sequence[float] | None = None,
                 existing: dict | None = None, contrast: Sequence[float] | None = None,
                 uncertainty_max: float = 1.0, region_box: tuple | None = None,
                 region_text: str = ""):
    """A ``neuroglancer.ViewerState`` with image layers for ``source``, ``restored`` (grey,
    ``contrast`` = (lo, hi), transparent where nothing was written) and ``uncertainty`` (orange,
    alpha from the value), plus the restored region as a box in the ``restored regions``
    annotation layer (``region_box`` = (start, stop) in units of ``resolution_nm_xyz``).
    ``position_xyz`` is in units of ``resolution_nm_xyz`` (the global dimensions; give the
    restored layer's resolution so that stepping in z visits every generated section). Layers
    of ``existing`` (a state's JSON) are kept; layers with the same name are replaced."""
    import neuroglancer
    names = {"source": "source", "restored": "restored", "uncertainty": "uncertainty", **(names or {})}
    state = neuroglancer.ViewerState(json.loads(json.dumps(existing)) if existing else None)
    lo, hi = contrast if contrast is not None else (0.0, 255.0)
    if source:
        state.layers[names["source"]] = neuroglancer.ImageLayer(source=_ng_source(source, prefix_map))
    if restored:
        state.layers[names["restored"]] = neuroglancer.ImageLayer(
            source=_ng_source(restored, prefix_map), shader=restored_shader(lo, hi), opacity=1.0)
    if uncertainty:
        state.layers[names["uncertainty"]] = neuroglancer.ImageLayer(
            source=_ng_source(uncertainty, prefix_map), shader=uncertainty_shader(uncertainty_max), opacity=0.8)
    if region_box is not None and resolution_nm_xyz is not None:
        old = state.layers[RESULT_LAYER].layer if RESULT_LAYER in [lay.name for lay in state.layers] else None
        anns = [a for a in getattr(old, "annotations", []) if a.id != names["restored"]]
        anns.append(neuroglancer.AxisAlignedBoundingBoxAnnotation(
            id=names["restored"], point_a=[float(v) for v in region_box[0]],
            point_b=[float(v) for v in region_box[1]], description=region_text or names["restored"]))
        state.layers[RESULT_LAYER] = neuroglancer.LocalAnnotationLayer(
            dimensions=_meters(resolution_nm_xyz), annotations=anns, annotation_color="#ffd400",
            tool="annotateBoundingBox")
    if resolution_nm_xyz is not None:
        state.dimensions = _meters(resolution_nm_xyz)
    if position_xyz is not None:
        state.position = [float(v) for v in position_xyz]
    if state.cross_section_scale is None:
        state.cross_section_scale = 1.0
    if not (existing or {}).get("layout"):
        state.layout = "4panel"
    if restored:
        state.selected_layer.layer = names["restored"]
        state.selected_layer.visible = True
    return state


def state_for_layers(source: str | None, restored: str | None = None, uncertainty: str | None = None,
                     **kw) -> dict:
    """The JSON of :func:`viewer_state` (what state files and links hold; same arguments)."""
    return viewer_state(source, restored, uncertainty, **kw).to_json()


def state_link(state: dict, prefix: str = DEFAULT_NG_LINK_PREFIX) -> str:
    """A Neuroglancer link (``<prefix>/#!<url-encoded JSON>``) opening ``state``."""
    text = json.dumps(state, separators=(",", ":"))
    return prefix.rstrip("/") + "/#!" + urllib.parse.quote(text, safe="")


def write_state(path_or_url: str, source: str | None, restored: str | None = None,
                uncertainty: str | None = None, *, prefix_map: Any = None, names: dict | None = None,
                position_xyz: Sequence[float] | None = None, resolution_nm_xyz: Sequence[float] | None = None,
                update: bool = True, link_prefix: str = DEFAULT_NG_LINK_PREFIX,
                contrast: Sequence[float] | None = None, region_box_out: tuple | None = None,
                region_text: str = "") -> tuple[str, str]:
    """Write (or update) a Neuroglancer state JSON file; returns (where, link).

    ``path_or_url``: a local path, ``file://`` URL or any store cloud-files can write (gs://, s3://).
    When ``resolution_nm_xyz`` is not given it is the restored layer's (or the source's);
    ``contrast`` defaults to the source's statistics; ``region_box_out`` (output voxels; default:
    the chunks written to ``restored``) becomes the box in the ``restored regions`` layer.
    """
    from .util import layer_geometry
    existing = _read_json(path_or_url) if update else None
    geom = None
    for u in (restored, source):
        if u:
            try:
                geom = layer_geometry(u)
                break
            except Exception:  # noqa: BLE001 - a state without dimensions still opens
                continue
    if resolution_nm_xyz is None and geom is not None:
        resolution_nm_xyz = geom["resolution_nm_xyz"]
        if position_xyz is None:
            position_xyz = [o + s / 2 for o, s in zip(geom["voxel_offset_xyz"], geom["size_xyz"])]
    if contrast is None and source:
        contrast = contrast_from_source(source)
    region_box = None
    if restored and geom is not None and resolution_nm_xyz is not None:
        box = region_box_out or restored_box(restored)
        if box is not None:
            region_box = box_to_units(box, geom["resolution_nm_xyz"], resolution_nm_xyz)
            position_xyz = [(a + b) / 2 for a, b in zip(*region_box)]
    unc_max = 1.0
    if uncertainty:
        try:
            unc_max = 255.0 if layer_geometry(uncertainty)["dtype"] == "uint8" else 1.0
        except Exception:  # noqa: BLE001
            pass
    state = state_for_layers(source, restored, uncertainty, prefix_map=prefix_map, names=names,
                             position_xyz=position_xyz, resolution_nm_xyz=resolution_nm_xyz, existing=existing,
                             contrast=contrast, uncertainty_max=unc_max, region_box=region_box,
                             region_text=region_text)
    _write_json(path_or_url, state)
    return path_or_url, state_link(state, link_prefix)


def _read_json(url: str) -> dict | None:
    data = read_json_url(url)
    return data if isinstance(data, dict) else None


def _write_json(url: str, data: dict) -> None:
    write_json_url(url, data, "url")


def register_state_target(job: dict, target) -> str:
    """The ``neuroglancer`` target (:class:`connector.targets.Target`): write/update the state JSON
    at the target's ``url`` (operator configuration) with the job's layers and restored region.

    Options: ``public_url_map`` (see :func:`connector.util.public_url`), ``include_source``
    (default true), ``layer_name`` (default ``restored <job>``), ``link_prefix``.
    """
    from .util import option
    url = target.url
    if url.startswith(("http://", "https://")):
        raise ConnectorError("url", f"target {target.name}: a state file is written to a path, file://, gs:// or "
                                    "s3:// URL")
    opts = target.options
    short = job["job_id"][-8:]
    names = {"source": "source", "restored": option(opts, "layer_name", f"restored {short}"),
             "uncertainty": f"uncertainty {short}"}
    include_source = str(option(opts, "include_source", "true")).lower() not in ("0", "false", "no")
    restored, unc = job["output"], job.get("uncertainty_output")
    box = job.get("region_out")
    text = (f"restored by job {short}: output voxels {box[0]}–{box[1]}" if box else f"restored by job {short}")
    where, link = write_state(url, job.get("source") if include_source else None, restored, unc,
                              prefix_map=option(opts, "public_url_map"), names=names,
                              link_prefix=option(opts, "link_prefix", DEFAULT_NG_LINK_PREFIX),
                              region_box_out=box, region_text=text)
    return f"neuroglancer: wrote state {where} with layer '{names['restored']}'" + (
        f" and '{names['uncertainty']}'" if unc else "") + f" ({text}); link: {link[:120]}{'…' if len(link) > 120 else ''}"

