"""Sources as labs store them (issue 23): jpeg + sharded layers with missing chunks (missing
tissue), a non-zero voxel offset and two scales, restored end to end through the real gRPC server
and local worker processes on file://, S3 (moto) and gs:// (fake-gcs-server); missing voxels never
leak into restored tissue; the dataset normalisation skips missing chunks and reads a bounded
sample; a store's unusable reply is the store's error, not the user's."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from service.volume import precomputed as pc
from service.volume.geometry import Box
from tests.layouts import write_layer

OFFSET_XYZ = (40, 24, 3)
CHUNK_XYZ = (32, 32, 3)
# tissue ends at x = 104: the right column of chunks was never written (a whole block of the job
# below), and one chunk inside the tissue is missing too (sections 6–8, x 72–104, y 24–56)
OUTSIDE = Box((3, 24, 104), (12, 88, 136))
HOLE = Box((6, 24, 72), (9, 56, 104))


def lab_stack() -> np.ndarray:
    from service.engine import phantom
    iso = phantom.make_phantom((25, 64, 96), seed=5)
    return phantom.to_uint8(phantom.thick_sections(iso, 3, mode="sample"))


def test_lab_layouts_restored_end_to_end_on_file_s3_and_gs(request, tmp_path, tiny_iso_model, gcs_endpoint,
                                                             s3_endpoint, monkeypatch):
    """Three whole-dataset jobs at once, through the gRPC server and local worker processes, over
    a jpeg, sharded, offset, 2-scale layer with chunks absent — source and output on file://, on
    S3 (moto) and on gs:// (fake-gcs-server, with the model and an uncertainty layer there too),
    the ledger on gs://: blocks without tissue are skipped (marked done, nothing written, one
    summary event per task), the hole's output voxels are 0 (no data), the rest is restored with
    the source sections passed through."""
    from service.api.client import EmrestoreClient
    from service.api.server import build_server
    from service.engine.model import RestorationModel
    from service.jobs.executors import LocalExecutor
    from service.jobs.manager import JobManager

    monkeypatch.setenv("EMRESTORE_LEASE_TTL", "10")
    run = uuid.uuid4().hex[:10]
    roots = {"file": f"file://{tmp_path}", "s3": s3_endpoint.url(f"lab-{run}"), "gs": gcs_endpoint.url(f"lab-{run}")}
    ledger = gcs_endpoint.url(f"ledger-{run}")
    stack = lab_stack()
    source = None
    for root in roots.values():
        write_layer(f"{root}/em", stack, (8, 8, 24), OFFSET_XYZ, CHUNK_XYZ, encoding="jpeg", sharded=True,
                    absent=[OUTSIDE, HOLE], scales=2)
        cut = pc.LayerReader(f"{root}/em").read(Box((3, 24, 40), (12, 88, 136)))  # what the workers see
        assert HOLE in cut.missing and (source is None or np.array_equal(cut.data, source.data))
        source = cut
    gs_model = RestorationModel.load(tiny_iso_model[0]).save(f"{roots['gs']}/models/iso3")

    mgr = JobManager(ledger, LocalExecutor(ledger, default_parallelism=1, log_dir=str(tmp_path / "logs")),
                     poll_interval_s=0.3, block_size_xyz=(64, 64, 0))
    server, port = build_server(mgr, "127.0.0.1", 0)
    server.start()
    mgr.start()
    try:
        with EmrestoreClient(f"127.0.0.1:{port}") as c:
            jobs = {store: c.restore_dataset(f"{root}/em", gs_model if store == "gs" else tiny_iso_model[0],
                                             f"{root}/em_iso", steps=1, samples=2 if store == "gs" else 1,
                                             uncertainty=f"{root}/em_unc" if store == "gs" else None)
                    for store, root in roots.items()}
            finals = {store: c.wait(job.job_id, timeout=240) for store, job in jobs.items()}
        for store, final in finals.items():
            assert final.state == "SUCCEEDED", (store, final.message)
            # one stage-0 task (the output's one shard); its blocks: x 40–104 (the tissue) and
            # x 104–136 (none), each in z halves — those without tissue skipped, those with the hole partly
            plan = mgr.plan_of(final.job_id)
            assert final.blocks_total == plan.blocks.num_tasks == 1
            blocks = plan.blocks.blocks_in(0)
            skipped = sum(b.write.start[2] >= 104 for b in blocks)
            assert skipped >= 1 and len(blocks) - skipped >= 1
            events = [e for e in final.event_log if e["kind"] == "missing_source"]
            assert len(events) == 1, events  # one per task, not one per block
            assert f"{skipped} skipped and " in final.message, final.message
            assert f"task 0: {skipped} block(s) skipped" in events[0]["message"], events
    finally:
        server.stop(grace=1)
        mgr.close()

    present = source.present
    for store, root in roots.items():
        out = f"{root}/em_iso"
        info = pc.open_layer(out)
        assert info.voxel_offset_xyz == (40, 24, 10) and info.size_xyz == (96, 64, 25)
        reader = pc.LayerReader(out)
        # nothing was written where there is no tissue: the output's chunks there do not exist either
        assert reader.read(Box((10, 24, 104), (35, 88, 136))).all_missing, store
        got = reader.read(Box((10, 24, 40), (35, 88, 104)))
        assert not got.missing
        # source sections pass through where the source exists: section 3 + i sits at output z
        # 3·(3 + i) + 1, relative index 3·i; the output is jpeg as the source (re-encoded at the
        # default quality 90: close, not bit-exact — README "Pass-through")
        for i in range(9):
            keep = present[i, :, :64]
            diff = got.data[3 * i][keep].astype(float) - source.data[i, :, :64][keep]
            assert 10 * np.log10(255 ** 2 / max(np.mean(diff ** 2), 1e-9)) > 33, (store, i)
        # the hole (sections 6–8 = relative 3–5, rows 9–15) and the gaps on both sides (rows 7, 8
        # and 16, 17) are no data (0): restoration does not bridge missing sections
        assert got.data[7:18, 0:32, 32:64].max() == 0
        assert got.data[6, 0:32, 32:64].min() > 0 and got.data[18, 0:32, 32:64].min() > 0
        # generated voxels between present sections elsewhere
        assert got.data[1:3, :, :32].std() > 0 and (got.data[1:3] > 0).mean() > 0.95
    # the uncertainty layer on gs://: 0 (no data) over the hole, a spread elsewhere
    std = pc.LayerReader(f"{roots['gs']}/em_unc").read(Box((10, 24, 40), (35, 88, 104))).data
    assert std[7:18, 0:32, 32:64].max() == 0 and std[1:3].max() > 0


def test_missing_voxels_do_not_leak_into_restored_tissue(tiny_iso_model):
    """A block whose middle section lost a chunk (3 of 4 of its width): every output voxel
    restored from that chunk — the section there and the gaps on both sides — is 0 (no data),
    where restoring the 0s the store's fill gives invents tissue; and the restored tissue next to
    the hole stays close to what restoring the block with the chunk present gives (half the error
    of letting the 0s reach the network)."""
    from scipy import ndimage

    from service.engine.model import RestorationModel
    from service.engine.normalize import IntensityNorm
    from service.jobs.plans import RestorePlan
    from service.jobs.tasks import restore_block
    from service.volume.blocks import Block, Plan
    from service.volume.missing import output_present

    model_url, stack = tiny_iso_model
    vol = stack[:7, :48, :48]
    model = RestorationModel.load(model_url)
    read, write = Box((0, 0, 0), vol.shape), Box((1, 0, 0), (20, 48, 48))
    block = Block(0, read, write, sections=(0, 6))
    plan = RestorePlan(source="", mip=0, output="", uncertainty_output=None, model_url=model_url, task="isotropic",
                       factor=3, scale_xyz=(1, 1, 3), output_resolution_nm_xyz=(8.0, 8.0, 8.0), output_dtype="uint8",
                       norm=IntensityNorm.from_volume(stack).to_dict(), sampler="dpmpp2m", steps=1, samples=1,
                       seed=0, estimate="", tile=64, overlap=16,
                       blocks=Plan(stages=(), scale_xyz=(1, 1, 3), block_size_xyz=(48, 48, 19), lateral_context=0,
                                   write_box=write, source_box=read, explicit=(block,)),
                       num_blocks_planned=1)
    hole = Box((3, 0, 16), (4, 48, 48))  # section 3's chunk x ≥ 16 does not exist
    data = vol.copy()
    data[hole.slices()] = 0  # what a reader with fill_missing returns there
    cut = pc.Cutout(data, read, (hole,))

    full, _, _ = restore_block(plan, block, model, vol)  # the chunk present
    ours, _, _ = restore_block(plan, block, model, cut)
    zeros, _, _ = restore_block(plan, block, model, data)  # the 0s taken for tissue

    valid = output_present(cut.present, block, (1, 1, 3))
    assert (~valid).sum() == 5 * 48 * 32  # section 3 (output row 9) and the 2 gap rows each side, x ≥ 16
    assert ours[~valid].max() == 0 and ours[valid].min() > 0
    assert zeros[~valid].mean() > 20  # invented across the missing section
    near = ndimage.binary_dilation(~valid, iterations=3) & valid  # restored tissue next to the hole
    err = lambda a: float(np.abs(a[near].astype(float) - full[near].astype(float)).mean())  # noqa: E731
    assert err(ours) < 2.0 and err(ours) < 0.7 * err(zeros), (err(ours), err(zeros))


def test_dataset_norm_skips_missing_chunks_and_is_bounded(tmp_path, monkeypatch):
    """A jpeg layer whose tissue fills a third of the volume: the normalisation comes from the
    tissue (not pulled to 0 by the absent chunks); a 200 000² × 20 000 layer with 7 scales is
    normalised from a bounded sample in seconds; an empty layer is refused clearly."""
    import time

    from service.engine.normalize import IntensityNorm
    from service.errors import status_of
    from service.jobs import planning
    from service.volume.reader import LayerReader

    stack = (120 + lab_stack() // 4).astype(np.uint8)  # tissue grey levels 120–183
    url = f"file://{tmp_path}/sparse"
    write_layer(url, stack, (8, 8, 24), OFFSET_XYZ, CHUNK_XYZ, encoding="jpeg", sharded=True,
                absent=lambda b: b.start[2] >= 72, scales=2)
    norm = planning.dataset_norm(url, 0)
    truth = IntensityNorm.from_volume(stack[:, :, :32])
    assert abs(norm.lo - truth.lo) < 6 and abs(norm.hi - truth.hi) < 6 and norm.lo > 100
    assert planning.dataset_norm(url, 0) == norm  # deterministic

    # petascale: info only, plus the coarsest scale's chunks under the crops; reads are counted
    big = f"file://{tmp_path}/big"
    size, scales = [200_000, 200_000, 20_000], []
    for m in range(7):
        f = 2 ** m
        scales.append({"key": f"{5 * f}_{5 * f}_50", "size": [-(-size[0] // f), -(-size[1] // f), size[2]],
                       "voxel_offset": [0, 0, 0], "resolution": [5 * f, 5 * f, 50], "chunk_sizes": [[64, 64, 64]],
                       "encoding": "jpeg"})
    from cloudfiles import CloudFiles
    CloudFiles(big).put_json("info", {"type": "image", "data_type": "uint8", "num_channels": 1, "scales": scales})
    reads = []
    real_read = LayerReader.read
    monkeypatch.setattr(LayerReader, "read", lambda self, box, mip=0: reads.append((box, mip)) or real_read(self, box, mip))
    t0 = time.time()
    with pytest.raises(Exception) as e:
        planning.dataset_norm(big, 0)
    assert status_of(e.value)[0] == "FAILED_PRECONDITION" and "nothing to normalise" in str(e.value)
    assert time.time() - t0 < 30
    assert len(reads) <= 3 * planning.NORM_CROPS
    assert all(b.shape[0] == 1 and b.shape[1] <= 256 and b.shape[2] <= 256 for b, _ in reads)
    assert {m for _, m in reads} <= {6, 5, 4}  # the coarsest scales only
    # tissue in the coarsest scale's chunks under the first crops: normalised from them
    info6 = LayerReader(big).volume_info(6)
    crops = planning.norm_crops(info6, planning.NORM_CROPS)[:6]
    write_chunks(big, info6, crops, value=150)
    reads.clear()
    norm = planning.dataset_norm(big, 0)
    assert 140 <= norm.lo <= norm.hi <= 160 and {m for _, m in reads} == {6}


def write_chunks(url, info, boxes, value):
    """Write the 64³ jpeg chunks of ``info``'s scale under ``boxes`` as constant ``value`` + noise."""
    from cloudfiles import CloudFiles
    from cloudvolume import chunks
    rng = np.random.default_rng(0)
    key = "_".join(f"{r:g}" for r in info.resolution_nm_xyz)
    files = {}
    for b in boxes:
        lo = [a // c * c for a, c in zip(b.start, info.chunk_zyx)]
        hi = [min(a + c, s) for a, c, s in zip(lo, info.chunk_zyx, info.stop_zyx)]
        arr = np.clip(value + rng.normal(0, 3, [h - a for a, h in zip(lo, hi)]), 0, 255).astype(np.uint8)
        name = f"{key}/{lo[2]}-{hi[2]}_{lo[1]}-{hi[1]}_{lo[0]}-{hi[0]}"
        files[name] = chunks.encode(np.asfortranarray(arr.transpose(2, 1, 0)[..., None]), "jpeg")
    for k, v in files.items():
        CloudFiles(url).put(k, v, compress=None, raw=True)


def test_store_failure_is_the_stores_error_not_the_users(gcs_endpoint):
    """The reported failure: cloud-files' GCS ``exists`` batches its requests, which
    fake-gcs-server answers with a reply the client cannot parse ("Bad response: not
    multi-part", a ValueError — INVALID_ARGUMENT by default). Our probes make single-object calls,
    and a store's unusable reply becomes INTERNAL naming the store."""
    from cloudfiles import CloudFiles

    from service.errors import status_of
    from service.volume import stores
    from service.volume.info import _run_io

    from google.cloud import storage

    layer = gcs_endpoint.url("probe-layer")
    CloudFiles(layer).put_json("info", {})
    client = storage.Client(project="emrestore")

    def batch_exists():  # what CloudFiles(layer).exists("info") sends (its retries take 40 s here)
        with client.batch():
            client.bucket(gcs_endpoint.bucket).get_blob("probe-layer/info")

    with pytest.raises(ValueError, match="multi-part"):  # the emulator does not speak batch
        batch_exists()
    assert pc.object_exists(f"{layer}/info") and not pc.object_exists(f"{layer}/nope")
    with pytest.raises(Exception) as e:
        _run_io(batch_exists, layer, "source")
    code, msg = status_of(e.value)
    assert code == "INTERNAL" and layer in msg and msg.startswith("source:")
    # and a model directory and a layer on gs:// need no gcsfs
    assert stores.open_fs(f"{layer}/x")[0].protocol == ("gs", "gcs")


def test_one_table_maps_schemes_to_stores():
    """Every scheme the service accepts is a backend of stores.BACKENDS (or a registered alias):
    the policy, fsspec access and the ledger's atomic store all come from it."""
    from service.volume import stores
    from service.volume.policy import StorePolicy

    assert {"file", "memory", "s3", "gs", "http", "https"} <= set(stores.BACKENDS)
    assert stores.supported_schemes() >= set(stores.BACKENDS)
    for scheme in ("file", "s3", "gs"):
        StorePolicy(None).check(f"{scheme}://bucket/layer" if scheme != "file" else "/tmp/x", "source")
    with pytest.raises(ValueError, match="not supported"):
        stores.backend_for("ftp://host/x")
    with pytest.raises(ValueError, match="read-only"):
        stores.open_store("https://example.org/ledger")


def test_no_data_mask_per_task():
    """Which output voxels are no data: for super-resolution by 2 the 2×2 output pixels over a
    missing source pixel (inside the write box); for isotropic z by 3 a missing section empties
    its own output section and the two gaps on each side, never more."""
    from service.volume.blocks import Block
    from service.volume.missing import fill_from_nearest, output_present

    present = np.ones((3, 8, 8), bool)
    present[1, 2:4, 4:8] = False
    sr = Block(0, Box((0, 0, 0), (3, 8, 8)), Box((0, 2, 2), (3, 14, 14)))  # context 1 px each side
    mask = output_present(present, sr, (2, 2, 1))
    assert mask.shape == (3, 12, 12) and (~mask).sum() == 4 * 6  # 8 px × 4, clipped at the write box
    assert not mask[1, 2:6, 6:12].any() and mask[0].all() and mask[2].all()

    iso = Block(0, Box((0, 0, 0), (3, 8, 8)), Box((1, 0, 0), (8, 8, 8)), sections=(0, 2))
    mask = output_present(present, iso, (1, 1, 3))
    assert mask.shape == (7, 8, 8)
    assert not mask[:, 2:4, 4:8][1:6].any() and mask[:, 2:4, 4:8][[0, 6]].all()
    assert mask.sum() == mask.size - 5 * 2 * 4

    vol = np.arange(3 * 8 * 8, dtype=np.uint8).reshape(3, 8, 8)
    filled = fill_from_nearest(np.where(present, vol, 0), present, (40, 8, 8))
    hole = filled[1, 2:4, 4:8]  # from the nearest pixels of the same section (8 nm), not z (40 nm)
    assert hole.min() >= 64 and hole.max() < 128
    assert (hole[0, 1:] == vol[1, 1, 5:8]).all() and (hole[1, 1:] == vol[1, 4, 5:8]).all()  # rows above, below
    assert (filled[present] == vol[present]).all()
