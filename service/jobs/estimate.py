"""The price before the work: what a restore job would do, from its plan alone (a dry run).

Tasks and stages, objects and bytes per layer and scale, network evaluations and GPU-hours —
computed from the plan's grids (no block or chunk is listed), so a whole 1 mm³ dataset is priced
in milliseconds. Bytes of raw layers are exact; jpeg and png are estimates whose basis is stated
(the compression measured on a restored real EM layer, bench/results/formats.md). GPU-hours use
the throughput measured for the model's preset on a named card and date; a preset without a
measured figure says so instead of guessing.
"""

from __future__ import annotations

import numpy as np

from ..volume.pyramid import LayerFormat, ScaleSpec, layer_scales

#: bytes per voxel of mip-0 shards of a *restored* real EM layer (FlyEM FIB-SEM, k = 5, 64×64×10
#: chunks, the service's own output of a tiny model trained on the kept sections: bench/formats.py →
#: bench/results/formats.md, 2026-12-04)
COMPRESSED_BYTES_PER_VOXEL = {
    ("jpeg", 75): 0.142, ("jpeg", 85): 0.188, ("jpeg", 90): 0.238, ("jpeg", 95): 0.348, ("png", None): 0.553,
}
COMPRESSION_BASIS = ("bytes per voxel measured on a restored FlyEM FIB-SEM layer written by the service "
                     "(bench/results/formats.md, 2026-12-04)")

#: measured network throughput per preset: pixel-evaluations per second (one evaluation of a
#: 256² tile = 65 536 pixel-evaluations), and where the figure comes from
THROUGHPUT = {
    "tiny": (30.8e6, "NVIDIA H100 80GB HBM3, 2026-11-27 (bench/results/realz_h100.md): the mean of the FlyEM cube, "
                     "15.4 M output voxels at 2 evaluations each, in 1.0 s end to end (tiling, transfers included)"),
    "base": (35.2e6, "NVIDIA H100 80GB HBM3, 2026-11-27 (bench/results/gpu_check.md): network forward only, "
                     "256² tiles in batches of 32, bf16: 1.86 ms per evaluation (an upper bound on throughput)"),
}


def evaluations_per_voxel(task: str, estimate: str, samples: int, steps: int) -> int:
    """Network evaluations that touch each output voxel (views × per-image evaluations): the
    mean alone is one predictor evaluation; samples add ``steps`` evaluations each."""
    views = 2 if task == "isotropic" else 1
    per_image = 1 if (estimate in ("", "mean") and samples < 2) else 1 + samples * steps
    return views * per_image


def _bytes(scale: ScaleSpec, voxels: int, itemsize: int) -> tuple[int, str]:
    if scale.encoding == "raw":
        return voxels * itemsize, "exact (raw)"
    key = (scale.encoding, scale.jpeg_quality if scale.encoding == "jpeg" else None)
    if key not in COMPRESSED_BYTES_PER_VOXEL and scale.encoding == "jpeg":
        q = min((k[1] for k in COMPRESSED_BYTES_PER_VOXEL if k[0] == "jpeg"), key=lambda v: abs(v - scale.jpeg_quality))
        key = ("jpeg", q)
    ratio = COMPRESSED_BYTES_PER_VOXEL[key] * itemsize
    return int(voxels * ratio), f"estimate: {ratio:.3f} bytes/voxel ({key[0]}{'' if key[1] is None else f' q{key[1]}'})"


def layer_rows(name: str, scales: list[ScaleSpec], job_box0, itemsize: int) -> list[dict]:
    """Objects and bytes of one layer, per scale, over the job's box."""
    rows = []
    for sc in scales:
        box = job_box0.shrink_by(sc.factor_zyx).intersect(sc.bounds)
        if sc.sharding is not None:
            box = box.snap(sc.unit_zyx, sc.bounds.start).intersect(sc.bounds)
        voxels = box.size
        nbytes, basis = _bytes(sc, voxels, itemsize)
        rows.append({"layer": name, "mip": sc.mip, "resolution_nm": list(sc.resolution_nm_xyz),
                     "objects": sc.units_in(box), "chunks": sc.chunks_in(box), "voxels": voxels, "bytes": nbytes,
                     "bytes_basis": basis, "sharded": sc.sharding is not None})
    return rows


def estimate(planning, preset: str | None) -> dict:
    """What the planned job would do (``planning``: planning.RestorePlanning)."""
    plan = planning.plan
    geom = planning.geometry
    blocks = plan.blocks
    itemsize = np.dtype(plan.output_dtype).itemsize
    fmt = planning.fmt
    scales = layer_scales(geom.size_xyz, geom.voxel_offset_xyz, geom.resolution_nm_xyz, geom.chunk_size_xyz,
                          itemsize, fmt, geom.downsample_factors_xyz)
    rows = layer_rows("output", scales, blocks.write_box, itemsize)
    if plan.uncertainty_output:
        ufmt = uncertainty_format(fmt, itemsize)
        uscales = layer_scales(geom.size_xyz, geom.voxel_offset_xyz, geom.resolution_nm_xyz, geom.chunk_size_xyz,
                               1, ufmt, geom.downsample_factors_xyz)
        rows += layer_rows("uncertainty", uscales, blocks.write_box, 1)
    out_voxels = blocks.write_box.size
    epv = evaluations_per_voxel(plan.task, plan.estimate, plan.samples, plan.steps)
    bx, by, _ = blocks.block_size_xyz
    ctx = blocks.lateral_context * plan.scale_xyz[0]
    context = (bx + 2 * ctx) * (by + 2 * ctx) / (bx * by)
    pixel_evals = out_voxels * epv * context
    tput = THROUGHPUT.get(preset or "")
    gpu = {"preset": preset, "pixel_evaluations": pixel_evals,
           "tile_evaluations_256": pixel_evals / 65536.0}
    if tput:
        gpu.update(gpu_hours=pixel_evals / tput[0] / 3600.0, basis=tput[1])
    else:
        gpu.update(gpu_hours=None, basis=f"no throughput has been measured for the {preset!r} preset on a GPU; "
                                         "not estimated")
    stages = [{"stage": st.index, "scales": [st.base_mip, st.top_mip], "tasks": st.num_tasks,
               "task_shape_xyz": list(st.cell[::-1])} for st in blocks.stages]
    return {
        "source": plan.source, "output": plan.output, "uncertainty_output": plan.uncertainty_output,
        "model": plan.model_url, "task": plan.task, "factor": plan.factor, "output_format": fmt.describe(),
        "output_voxels": out_voxels, "write_box_zyx": blocks.write_box.to_list(), "region_message": blocks.message,
        "tasks": blocks.num_tasks, "restoration_blocks": blocks.num_blocks, "stages": stages, "layers": rows,
        "objects_total": sum(r["objects"] for r in rows), "bytes_total": sum(r["bytes"] for r in rows),
        "evaluations_per_output_voxel": epv, "lateral_context_factor": round(context, 3), "gpu": gpu,
        "incremental_from": list(planning.previous_jobs),
    }


def uncertainty_format(fmt: LayerFormat, output_itemsize: int) -> LayerFormat:
    """The uncertainty layer's format: uint8, lossless (png when the output is compressed), sharded
    like the output with shards of the same shape (the target scaled by the dtype sizes)."""
    return LayerFormat(encoding="raw" if fmt.encoding == "raw" else "png", sharded=fmt.sharded,
                       shard_bytes=max(1, fmt.shard_bytes // output_itemsize))


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB", "EB"):
        if abs(n) < 1000 or unit == "EB":
            return f"{n:.3g} {unit}"
        n /= 1000.0
    return f"{n:.3g}"


def format_estimate(e: dict) -> str:
    """The dry run as text (CLI)."""
    lines = [f"dry run: nothing written. {e['task']} ×{e['factor']} of {e['source']} → {e['output']} "
             f"({e['output_format']})",
             f"  {e['output_voxels']:.4g} output voxels, {e['tasks']} tasks in {len(e['stages'])} stage(s), "
             f"{e['restoration_blocks']} restoration blocks"]
    if e.get("region_message"):
        lines.append(f"  {e['region_message']}")
    for st in e["stages"]:
        lines.append(f"  stage {st['stage']}: scales {st['scales'][0]}–{st['scales'][1]}, {st['tasks']} tasks "
                     f"of {'×'.join(map(str, st['task_shape_xyz']))} voxels")
    lines.append("  layer        mip  resolution nm          objects        bytes")
    for r in e["layers"]:
        res = "×".join(f"{v:g}" for v in r["resolution_nm"])
        lines.append(f"  {r['layer']:<12} {r['mip']:>3}  {res:<20} {r['objects']:>9}  {_size(r['bytes']):>11}"
                     + ("  (shards)" if r["sharded"] else ""))
    lines.append(f"  total: {e['objects_total']} objects, {_size(e['bytes_total'])}"
                 + ("; " + next((r["bytes_basis"] for r in e["layers"] if "estimate" in r["bytes_basis"]), "")
                    if any("estimate" in r["bytes_basis"] for r in e["layers"]) else ""))
    if any("estimate" in r["bytes_basis"] for r in e["layers"]):
        lines.append(f"  compressed bytes: {COMPRESSION_BASIS}")
    g = e["gpu"]
    lines.append(f"  network: {e['evaluations_per_output_voxel']} evaluations per output voxel × lateral context "
                 f"{e['lateral_context_factor']} = {g['tile_evaluations_256']:.4g} evaluations of 256² tiles")
    if g.get("gpu_hours") is not None:
        lines.append(f"  GPU time: {g['gpu_hours']:.4g} GPU-hours ({g['preset']} preset; {g['basis']})")
    else:
        lines.append(f"  GPU time: {g['basis']}")
    if e.get("incremental_from"):
        lines.append(f"  incremental: tasks done by {', '.join(e['incremental_from'])} are kept")
    return "\n".join(lines)

