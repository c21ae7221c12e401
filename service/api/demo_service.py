"""The service half of the README demo: the input stack → precomputed layer → gRPC service with local
workers → restored isotropic layer and uncertainty layer → picture and Neuroglancer state."""

from __future__ import annotations

import json
import os
import time

import numpy as np


def run_service_demo(workdir: str, aniso: np.ndarray, voxel_size_nm, model_url: str, quick: bool = False,
                     caption: str = "") -> dict:
    from importlib.metadata import entry_points
    from ..jobs.executors import LocalExecutor
    from ..jobs.manager import JobManager
    from ..viz import heat8, nearest_z, panels_png, to_gray8
    from ..volume import precomputed as pc
    from .client import EmrestoreClient
    from .server import build_server

    root = os.path.abspath(workdir)
    src = f"file://{root}/layers/em"
    out = f"file://{root}/layers/em_isotropic"
    unc = f"file://{root}/layers/em_uncertainty"
    k = int(round(voxel_size_nm[2] / voxel_size_nm[0]))
    if not os.path.exists(os.path.join(root, "layers", "em", "info")):
        pc.create_source_layer(src, aniso, voxel_size_nm, (0, 0, 0), (64, 64, 4))
    ledger = f"file://{root}/service/ledger"
    mgr = JobManager(ledger, LocalExecutor(ledger, default_parallelism=2, log_dir=f"{root}/service/logs"),
                     models_dir=os.path.dirname(model_url), poll_interval_s=0.3, block_size_xyz=(128, 128, 0))
    server, port = build_server(mgr, "127.0.0.1", 0)
    server.start()
    mgr.start()
    t0 = time.time()
    try:
        with EmrestoreClient(f"127.0.0.1:{port}") as client:
            print(f"[demo] service on 127.0.0.1:{port} ({client.health()}); models: "
                  f"{', '.join(m['name'] for m in client.models())}")
            # the service path shows the layers and the job: the mean with its uncertainty layer
            # (the model's error head and the views' disagreement; no samples)
            workers = 1 if quick else 2
            job = client.restore_dataset(src, os.path.basename(model_url), out, uncertainty=unc,
                                         parallelism=workers)
            print(f"[demo] job {job.job_id}: restoring {src} → {out} in {job.blocks_total} blocks with "
                  f"{workers} local worker(s)")

            def show(p):
                rate = f", {p.voxels_per_second / 1e3:.0f} kvoxel/s" if p.voxels_per_second else ""
                print(f"[demo]   {p.state}: {p.blocks_done}/{p.blocks_total} blocks{rate}", flush=True)

            final = client.wait(job.job_id, progress=show)
    finally:
        server.stop(grace=2)
        mgr.close()
    if final.state != "SUCCEEDED":
        raise RuntimeError(f"demo job {final.job_id} ended {final.state}: {final.message}")
    info = pc.open_layer(out)
    restored = pc.read_zyx(out, info.start_zyx, info.stop_zyx)
    std = pc.read_zyx(unc, info.start_zyx, info.stop_zyx)
    y = restored.shape[1] // 2
    png = panels_png(os.path.join(root, "service_before_after_xz.png"), [
        ("source layer (XZ)", to_gray8(nearest_z(aniso, k, restored.shape[0])[:, y, :], 0, 255)),
        ("restored layer (service)", to_gray8(restored[:, y, :], 0, 255)),
        ("uncertainty layer", heat8(std[:, y, :])),
    ], caption=caption)
    # the state reads the layers over http (browsers cannot read file://): serve demo-output/layers
    # with CORS on port 8000, or simply run `emrestore view`, which serves them itself
    # the Neuroglancer state comes from the connectors' plug-in (the service never imports them)
    (plugin,) = entry_points(group="emrestore.viewer_state")
    state = plugin.load()(src, out, unc, resolution_nm_xyz=info.resolution_nm_xyz,
                             position_xyz=[o + s / 2 for o, s in zip(info.voxel_offset_xyz, info.size_xyz)],
                             prefix_map=f"file://{root}/layers=http://127.0.0.1:8000")
    state_path = os.path.join(root, "neuroglancer_state.json")
    with open(state_path, "w") as f:
        json.dump(state, f, indent=2)
    print(f"[demo] service restored layer {out} ({info.size_xyz[2]} sections at "
          f"{info.resolution_nm_xyz[2]:g} nm, z offset {info.voxel_offset_xyz[2]}) and {unc}")
    print(f"[demo] pictures: {png}; Neuroglancer state: {state_path} "
          f"(browse: emrestore view {src} --model {model_url})")
    return {"service_job": final.job_id, "service_state": final.state, "service_seconds": round(time.time() - t0, 1),
            "service_output": out, "service_uncertainty": unc, "neuroglancer_state": state_path}
