"""Output formats on real EM, side by side: raw-unsharded vs raw/png/jpeg-sharded layers of the
same restored FlyEM FIB-SEM volume (Janelia Research Campus / HHMI FlyEM, CC-BY).

1. The FlyEM cube (10 nm isotropic; a lateral crop, all z) with every 5th slice kept becomes a
   Precomputed source (raw, 64 × 64 × 10 chunks); a tiny model is trained on the kept sections
   (self-supervised) and the service restores the source into a raw, unsharded layer (a job:
   JobManager + the worker's run_task) — the real EM layer written by the service.
2. That restored volume is then written by the service's writer into one layer per format, over
   the same stage grid the worker uses (stage 0 writes mip 0 and the scales its tasks cover,
   later stages average the scale below), on file:// and on S3 (moto): objects, bytes, seconds,
   requests (store writes) per task, per restored gigavoxel, and extrapolated to a restored mm³.
3. Quality: PSNR against the dropped slices (the truth) of the restored output as each format
   stores it, and of linear interpolation stored the same way: the restoration's gain over
   linear after encoding; and how far the passed-through source sections move under jpeg.

``python bench/formats.py`` (writes bench/results/formats.md and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from common import OUT_DIR, Timer, machine, table, today, write_report  # noqa: E402

DATA = os.environ.get("EMRESTORE_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
FLYEM = os.path.join(DATA, "flyem-fibsem", "sample1.tif")
K = 5
VOXEL = (10.0, 10.0, 50.0)
MM3_VOXELS = 1e21 / (10 * 10 * 10)  # a restored mm³ at this layer's 10 nm isotropic voxels


def psnr(a, b):
    return 10 * np.log10(255.0 ** 2 / np.mean((np.asarray(a, float) - np.asarray(b, float)) ** 2))


def store_sizes(root_fs_path):
    n = size = 0
    for dirpath, _, files in os.walk(root_fs_path):
        for f in files:
            if f in ("info", "provenance"):
                continue
            n += 1
            size += os.path.getsize(os.path.join(dirpath, f))
    return n, size


def write_layer(url, vol, geom, fmt, plan_blocks_args):
    """Write the restored volume as ``fmt`` through the service's writer over its stage grid;
    returns (seconds, tasks, per-stage task counts)."""
    from service.jobs.tasks import build_scales
    from service.volume import precomputed as pc
    from service.volume.blocks import plan_blocks
    from service.volume.pyramid import layer_scales
    pc.create_output_layer(url, geom, geom.chunk_size_xyz, "uint8", {"bench": fmt.describe()}, None, fmt=fmt)
    scales = layer_scales(geom.size_xyz, geom.voxel_offset_xyz, geom.resolution_nm_xyz, geom.chunk_size_xyz, 1, fmt,
                          pc.open_layer(url).downsample_factors_xyz)
    from service.volume.blocks import write_grid
    src, block = plan_blocks_args
    g = scales[0].chunk_zyx if fmt.sharded else write_grid(scales)
    block = tuple(-(-b // u) * u for b, u in zip(block, g[::-1]))
    plan = plan_blocks(src, geom, (1, 1, K), block, 0, scales=scales, cell_bytes=fmt.shard_bytes)

    class P:  # the part of a RestorePlan build_scales reads
        output, uncertainty_output = url, None
    t0 = time.perf_counter()
    start = np.array(geom.start_zyx)
    for i in range(plan.num_tasks):
        t = plan.task(i)
        if t.restores:
            sl = tuple(slice(a - s, b - s) for a, b, s in zip(t.box.start, t.box.stop, start))
            pc.write_scales(url, t.box.start, np.ascontiguousarray(vol[sl]), 0, t.stage.top_mip)
        else:
            build_scales(P, t)
    return time.perf_counter() - t0, plan.num_tasks, [s.num_tasks for s in plan.stages]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--crop", type=int, default=128, help="lateral crop of the FlyEM cube (px)")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the tiny model")
    ap.add_argument("--model", default=None, help="reuse a model directory (skips training)")
    ap.add_argument("--save-model", default=None, help="keep the trained model in this directory")
    ap.add_argument("--qualities", default="75,85,90,95")
    ap.add_argument("--no-s3", action="store_true")
    a = ap.parse_args()
    if not os.path.exists(FLYEM):
        print("FlyEM cube absent (../shared/data/flyem-fibsem): nothing to measure")
        return
    import tifffile

    from service.jobs.executors import LocalExecutor
    from service.jobs.manager import JobManager
    from service.jobs.spec import RestoreSpec
    from service.jobs.worker import run_task
    from service.volume import precomputed as pc
    from service.volume.pyramid import LayerFormat

    cube = tifffile.imread(FLYEM)  # (z, y, x), 10 nm isotropic
    c = a.crop
    y0 = (cube.shape[1] - c) // 2
    truth = cube[: (cube.shape[0] - 1) // K * K + 1, y0:y0 + c, y0:y0 + c]
    kept = truth[::K]
    work = tempfile.mkdtemp(prefix="emrestore-formats-")
    src = f"file://{work}/src"
    pc.create_source_layer(src, kept, VOXEL, (0, 0, 0), (64, 64, 10))
    if a.model:
        model_url = a.model
    else:
        from realz import train_model
        with Timer() as t_train:
            m = train_model(kept, K, a.steps, VOXEL)
        model_url = f"file://{a.save_model or work + '/model'}"
        m.save(model_url)
        print(f"[formats] trained {a.steps} steps in {t_train.seconds:.0f} s")
    ledger = f"file://{work}/ledger"
    mgr = JobManager(ledger, LocalExecutor(ledger, log_dir=f"{work}/logs"), block_size_xyz=(128, 128, 0))
    restored_url = f"file://{work}/restored"
    with Timer() as t_restore:
        job = mgr.submit(RestoreSpec(source=src, model=model_url, output=restored_url),
                         output_encoding="raw", output_sharding="unsharded")
        mgr.executor.cancel(job.job_id)  # run the worker in this process (its timing is the write path's)
        run_task(ledger, job.job_id, 0, 1, log=lambda m: None)
    info = pc.open_layer(restored_url)
    restored = pc.read_zyx(restored_url, info.start_zyx, info.stop_zyx)
    # the layer spans the first to the last section centre: output z j ↔ truth slice j
    truth_c = truth[: restored.shape[0]]
    gen = np.ones(restored.shape[0], bool)
    gen[::K] = False
    from common import linear_interp
    linear = np.clip(np.rint(linear_interp(kept, K)), 0, 255).astype(np.uint8)[: restored.shape[0]]
    geom = pc.output_geometry(pc.open_source(src), (1, 1, K), chunk_size_xyz=info.chunk_size_xyz)
    srcinfo = pc.open_source(src)

    qualities = [int(q) for q in a.qualities.split(",")]
    formats = ([("raw", LayerFormat("raw")), ("raw, sharded", LayerFormat("raw", sharded=True)),
                ("png, sharded", LayerFormat("png", sharded=True))]
               + [(f"jpeg q{q}, sharded", LayerFormat("jpeg", q, sharded=True)) for q in qualities]
               + [(f"jpeg q{qualities[-2]}, unsharded", LayerFormat("jpeg", qualities[-2]))])
    rows, out = [], {"date": today(), "machine": machine(), "crop": c, "k": K, "restore_seconds": t_restore.seconds,
                     "model": model_url, "formats": []}
    gvox = restored.size / 1e9
    for name, fmt in formats:
        url = f"file://{work}/f-{abs(hash(name))}"
        secs, tasks, per_stage = write_layer(url, restored, geom, fmt, (srcinfo, (128, 128, 10)))
        n, size = store_sizes(url[len("file://"):])
        back = pc.read_zyx(url, info.start_zyx, info.stop_zyx)
        lin_url = f"file://{work}/l-{abs(hash(name))}"
        write_layer(lin_url, linear, geom, fmt, (srcinfo, (128, 128, 10)))
        lin_back = pc.read_zyx(lin_url, info.start_zyx, info.stop_zyx)
        p_ours, p_lin = psnr(back[gen], truth_c[gen]), psnr(lin_back[gen], truth_c[gen])
        p_pass = psnr(back[~gen], truth_c[~gen]) if fmt.encoding == "jpeg" else float("inf")
        mip0_bytes = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(url[7:] + "/" + info_key(url))
                         for f in fs)
        r = {"format": name, "objects": n, "bytes": size, "objects_per_gvox": n / gvox, "bytes_per_gvox": size / gvox,
             "mip0_bytes_per_voxel": mip0_bytes / restored.size, "write_seconds": secs, "tasks": tasks,
             "writes_per_task": n / tasks, "psnr_restored": p_ours, "psnr_linear": p_lin, "gain_db": p_ours - p_lin,
             "pass_through_psnr": p_pass, "stages": per_stage,
             "mm3_objects": n / gvox * MM3_VOXELS / 1e9, "mm3_bytes": size / gvox * MM3_VOXELS / 1e9}
        out["formats"].append(r)
        rows.append([name, n, f"{size / 1e6:.2f}", f"{n / gvox:.3g}", f"{size / gvox / 1e9:.3f}",
                     f"{r['mip0_bytes_per_voxel']:.3f}", f"{secs:.2f}", f"{n / tasks:.1f}", f"{p_ours:.2f}",
                     f"{p_lin:.2f}", f"{p_ours - p_lin:+.2f}",
                     "exact" if fmt.encoding != "jpeg" else f"{p_pass:.1f}",
                     f"{r['mm3_objects']:.2g}", f"{r['mm3_bytes'] / 1e15:.3g}"])
        print(f"[formats] {name}: {n} objects, {size / 1e6:.2f} MB, {secs:.2f} s, restored {p_ours:.2f} dB")
    raw = out["formats"][0]
    out["restored_vs_linear_raw_db"] = raw["gain_db"]
    s3_rows = [] if a.no_s3 else s3_writes(restored, geom, srcinfo, [f for f in formats if f[0] in
                                                                      ("raw", "raw, sharded", f"jpeg q{qualities[-2]}, sharded")])
    out["s3"] = s3_rows
    text = (f"Output formats, {today()}, {machine()}. FlyEM FIB-SEM (Janelia Research Campus / HHMI FlyEM, CC-BY), "
            f"lateral crop {c}×{c} px, every {K}th slice kept (10×10×50 nm source, {kept.shape[0]} sections); tiny model "
            f"({'given' if a.model else f'{a.steps} steps'}); restored by the service in {t_restore.seconds:.0f} s into "
            f"{restored.shape[0]}×{c}×{c} voxels ({restored.size / 1e6:.1f} Mvoxel), then written in each format by "
            "the service's writer over the worker's stage grid (shards of 1 GiB target: one shard per scale here; "
            "64×64×10 chunks; full pyramid).\n\n")
    text += table(["format", "objects", "MB", "objects / GVx", "GB / GVx", "mip-0 bytes/voxel", "write s",
                   "writes / task", "PSNR restored dB", "PSNR linear dB", "gain dB", "pass-through dB",
                   "objects / mm³", "PB / mm³"], rows,
                  "Same restored volume, each format (file://); PSNR against the dropped slices")
    if s3_rows:
        text += "\n" + table(["format (S3, moto)", "objects", "PUT requests", "requests / task", "write s", "MB/s"],
                             [[r["format"], r["objects"], r["puts"], f"{r['puts'] / r['tasks']:.1f}",
                               f"{r['seconds']:.2f}", f"{r['mb_per_s']:.1f}"] for r in s3_rows],
                             "Writes to S3 (moto server on 127.0.0.1; data objects and their PUTs, the info and provenance not counted)")
    text += (f"\nRestored − linear, raw: {raw['gain_db']:+.2f} dB. 'objects / mm³' and 'PB / mm³' extrapolate per "
             "restored voxel to 10¹⁸ voxels (1 mm³ at 10 nm isotropic); sharded object counts at full size come "
             "from the planner (bench/results/planning.md), not from this small volume's one-shard-per-scale.\n")
    write_report("formats", text)
    with open(os.path.join(OUT_DIR, "formats.json"), "w") as f:
        json.dump(out, f, indent=1, default=float)


def info_key(url):
    from service.volume import precomputed as pc
    return "_".join(f"{r:g}" for r in pc.open_layer(url).resolution_nm_xyz)


def s3_writes(restored, geom, srcinfo, formats):
    """The same writes to S3 through a moto server: objects, PUT requests, seconds."""
    import logging

    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    from service.volume import stores
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                 region_name="us-east-1").create_bucket(Bucket="bench")
    cvdir = tempfile.mkdtemp()
    os.environ["CLOUD_VOLUME_DIR"] = cvdir
    stores.register_s3_endpoint("benchs3", endpoint, "k", "s", cloud_volume_dir=cvdir)
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    rows = []
    try:
        for name, fmt in formats:
            url = f"benchs3://bench/{abs(hash(name))}"
            puts = {"n": 0}
            import botocore.client
            real = botocore.client.BaseClient._make_api_call

            def counting(self, op, params, _real=real):
                if op == "PutObject":
                    puts["n"] += 1
                return _real(self, op, params)
            botocore.client.BaseClient._make_api_call = counting
            try:
                secs, tasks, _ = write_layer(url, restored, geom, fmt, (srcinfo, (128, 128, 10)))
            finally:
                botocore.client.BaseClient._make_api_call = real
            bucket = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets["bench"]
            keys = [k for k in bucket.keys.keys() if k.startswith(str(abs(hash(name))) + "/")]
            size = sum(bucket.keys[k].size for k in keys)
            # the layer's info and provenance are 2 of the PUTs; the rest are data objects
            rows.append({"format": name, "objects": len(keys) - 2, "puts": puts["n"] - 2, "tasks": tasks, "seconds": secs,
                         "mb_per_s": restored.size / 1e6 / secs, "bytes": size})
            print(f"[formats] S3 {name}: {len(keys)} objects, {puts['n']} PUTs, {secs:.2f} s")
    finally:
        server.stop()
    return rows


if __name__ == "__main__":
    main()
