"""Store requests per block when workers read a sharded jpeg source on S3 (moto), side by side:

- before: what the worker did until issue 23 — a new CloudVolume for every block
  (``cache=False``), so cloud-volume builds a new shard reader and fetches the shard and
  minishard indexes again for every block (here with ``fill_missing=True``, which the old worker
  lacked: without it a block over absent chunks failed);
- after: one ``LayerReader`` per task and layer (shard and minishard indexes and decoded chunks
  kept in memory), blocks in plan order, and the same with the task's blocks sorted by the
  source shard they start in (what ``run_task`` does).

Every GET reaching the moto server is counted (a WSGI wrapper), and the data read are checked to
be identical. The source is FlyEM-like: uint8 jpeg, ``neuroglancer_uint64_sharded_v1`` with an
identity hash, 64³ chunks, chunks outside the tissue absent.

    python bench/read_requests.py [--size 1024] [--sections 128] [--tasks 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from bench.common import OUT_DIR, machine, table, today, write_report  # noqa: E402


def counting_moto():
    """A moto S3 server on 127.0.0.1 counting the GET requests it serves."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    counts = {"GET": 0}
    lock = threading.Lock()

    class Counting(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = DomainDispatcherApplication(create_backend_app)

            def counted(environ, start_response):
                if environ.get("REQUEST_METHOD") == "GET":
                    with lock:
                        counts["GET"] += 1
                return app(environ, start_response)

            self._server = make_server(self._ip_address, self._port, counted, True, request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    import logging
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = Counting(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    return server, counts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024, help="lateral size of the source (pixels)")
    ap.add_argument("--sections", type=int, default=128)
    ap.add_argument("--tasks", type=int, default=2, help="worker tasks the blocks are striped over")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import boto3
    from cloudvolume import CloudVolume

    from service.engine import phantom
    from service.jobs.planning import Planner
    from service.jobs.spec import LATERAL_CONTEXT
    from service.volume import precomputed as pc
    from service.volume import stores
    from service.volume.blocks import plan_blocks
    from service.volume.geometry import Box
    from tests.layouts import sharding_spec, write_layer

    server, counts = counting_moto()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for var in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        os.environ.pop(var, None)
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k", aws_secret_access_key="s",
                 region_name="us-east-1").create_bucket(Bucket="bench")
    stores.register_s3_endpoint("benchs3", endpoint, "k", "s", cloud_volume_dir=tempfile.mkdtemp())

    # a FlyEM-like source: 8 nm × 8 nm × 40 nm, 64³ jpeg chunks, sharded; tissue is a disc
    n, z = args.size, args.sections
    iso = phantom.make_phantom((z, n // 4, n // 4), seed=1)
    vol = np.kron(phantom.to_uint8(iso), np.ones((1, 4, 4), np.uint8))[:, :n, :n]
    yy, xx = np.mgrid[:n, :n]
    tissue = (yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (0.45 * n) ** 2
    offset = (1024, 2048, 100)

    def outside(b: Box) -> bool:  # a chunk wholly outside the disc was never written
        (_, y0, x0), (_, y1, x1) = b.start, b.stop
        return not tissue[y0 - offset[1]:y1 - offset[1], x0 - offset[0]:x1 - offset[0]].any()

    spec = sharding_spec(preshift_bits=3, minishard_bits=2, shard_bits=3)
    layouts = {"sharded": "benchs3://bench/sharded", "unsharded": "benchs3://bench/unsharded"}
    write_layer(layouts["sharded"], vol, (8, 8, 40), offset, (64, 64, 64), encoding="jpeg", sharded=spec,
                absent=outside)
    write_layer(layouts["unsharded"], vol, (8, 8, 40), offset, (64, 64, 64), encoding="jpeg", absent=outside)

    # the blocks a denoise job of the whole layer plans (256² output blocks, 32 px of context)
    src = pc.open_source(layouts["sharded"])
    geom = Planner(None).output_geometry(src, (1, 1, 1), "uint8")
    blocks = list(plan_blocks(src, geom, (1, 1, 1), Planner(None, block_size_xyz=(256, 256, 0)).block_size(geom),
                              LATERAL_CONTEXT).blocks)
    tasks = [[b for b in blocks[t::args.tasks]] for t in range(args.tasks)]

    rows, record = [], {"date": today(), "machine": machine(), "blocks": len(blocks), "tasks": args.tasks,
                        "source": {"size_xyz": [n, n, z], "chunk_xyz": [64, 64, 64], "encoding": "jpeg",
                                   "sharding": spec, "tissue_fraction": float(tissue.mean())}, "rows": []}

    def run(name, layout, read_task):
        counts["GET"] = 0
        t0 = time.perf_counter()
        data = [read_task(task) for task in tasks]
        secs = time.perf_counter() - t0
        gets = counts["GET"]
        rows.append([name, layout, len(blocks), gets, round(gets / len(blocks), 1), round(1000 * secs / len(blocks), 1)])
        record["rows"].append({"reader": name, "layout": layout, "gets": gets, "gets_per_block": gets / len(blocks),
                               "ms_per_block": 1000 * secs / len(blocks)})
        return data

    def before(url):
        def read_task(task):
            out = {}
            for b in task:
                cv = CloudVolume(url, mip=0, cache=False, fill_missing=True, progress=False, parallel=1)
                (z0, y0, x0), (z1, y1, x1) = b.read.start, b.read.stop
                out[b.index] = np.asarray(cv[x0:x1, y0:y1, z0:z1])[..., 0].transpose(2, 1, 0)
            return out
        return read_task

    def after(url, by_shard):
        def read_task(task):
            reader = pc.LayerReader(url)
            order = sorted(task, key=lambda b: (reader.shard_key(b.read), b.index)) if by_shard else task
            return {b.index: reader.read(b.read).data for b in order}
        return read_task

    ref = run("before: new CloudVolume per block", "sharded", before(layouts["sharded"]))
    for name, fn in [("after: one LayerReader per task", after(layouts["sharded"], False)),
                     ("after: one LayerReader per task, blocks by shard", after(layouts["sharded"], True))]:
        got = run(name, "sharded", fn)
        assert all(np.array_equal(ref[t][i], got[t][i]) for t in range(args.tasks) for i in ref[t]), name
    ref = run("before: new CloudVolume per block", "unsharded", before(layouts["unsharded"]))
    got = run("after: one LayerReader per task", "unsharded", after(layouts["unsharded"], False))
    assert all(np.array_equal(ref[t][i], got[t][i]) for t in range(args.tasks) for i in ref[t])
    server.stop()

    text = (f"Reads of a whole-layer job's blocks from a jpeg source on S3 (moto), {today()}, {machine()}: "
            f"{n}×{n}×{z} voxels, 64³ chunks, {100 * (1 - tissue.mean()):.0f} % of the lateral area outside "
            f"the tissue (absent chunks), sharding preshift 3 / minishard 2 / shard 3 bits; {len(blocks)} blocks "
            f"of 256² px + 32 px context over {args.tasks} tasks; every GET served by moto counted; the "
            f"data read are identical. `python bench/read_requests.py`\n\n")
    text += table(["reader", "layout", "blocks", "GETs", "GETs per block", "ms per block"], rows,
                  title="Store requests per block")
    write_report("read_requests", text)
    with open(os.path.join(OUT_DIR, "read_requests.json"), "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
