"""Reading source layers as labs store them: one :class:`LayerReader` per worker and layer.

A lab's layer is uint8 jpeg (or raw, png), often sharded (``neuroglancer_uint64_sharded_v1``), at
any chunk size and voxel offset, on file://, s3://, gs:// or an S3-compatible alias, and the
chunks outside the tissue were never written. The reader

- holds the layer's info and, for sharded scales, in-memory LRUs of shard indexes and minishard
  indexes (cloud-volume's own ``download`` builds a new shard reader, so fetches the indexes
  again, for every cutout), and a small LRU of decoded chunks (neighbouring blocks share their
  lateral context), all reused across blocks; nothing is cached on disk;
- reads chunk by chunk, so it knows **which chunks do not exist** at no extra request: a missing
  unsharded chunk is a GET that finds nothing, a missing sharded chunk is absent from its
  minishard index (or its shard file is absent). Missing chunks are missing tissue, not errors:
  their voxels read as 0 and :class:`Cutout` lists them (``missing``, ``present``);
- takes a :class:`Box` (zyx, absolute voxels of the scale) and returns (Z, Y, X) arrays: the
  xyzc → zyx conversion of reading happens here and in info.py only.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .geometry import Box, ceildiv
from .info import VolumeInfo, _as_vec3, _check_box, _check_mip, _open_cv, _read_info, _volume_info_from_dict
from .stores import SourceNotFound, StoreError, translate_store_error

__all__ = ["Cutout", "LayerReader", "ReaderCache", "read_zyx"]

#: decoded chunks kept per reader (bytes); blocks' lateral context overlaps the next block's
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024
#: concurrent chunk GETs of one read from a remote store
FETCH_THREADS = 8
#: shard indexes (16 B × 2^minishard_bits each) and decoded minishard indexes kept per reader
SHARD_INDEXES_KEPT, MINISHARD_INDEXES_KEPT = 512, 1024


@dataclass(frozen=True)
class Cutout:
    """A box of a layer: ``data`` (Z, Y, X) with missing voxels 0, and the boxes (clipped to
    ``box``) of the chunks that do not exist in the store."""

    data: np.ndarray
    box: Box
    missing: tuple[Box, ...] = ()

    @property
    def present(self) -> np.ndarray | None:
        """Boolean (Z, Y, X) mask of the voxels whose chunk exists; None when none is missing."""
        if not self.missing:
            return None
        mask = np.ones(self.data.shape, dtype=bool)
        for b in self.missing:
            mask[b.slices(self.box.start)] = False
        return mask

    @property
    def all_missing(self) -> bool:
        """True when no chunk under the box exists (the box is outside the tissue)."""
        return bool(self.missing) and sum(b.size for b in self.missing) >= self.box.size


class _Scale:
    """One scale of a layer: its chunk grid, and its shard reader (sharded scales)."""

    def __init__(self, cv, mip: int):
        meta = cv.meta
        self.mip = mip
        self.key = meta.key(mip)
        self.encoding = meta.encoding(mip)
        cx, cy, cz = (int(v) for v in meta.chunk_size(mip))
        ox, oy, oz = (int(v) for v in meta.voxel_offset(mip))
        sx, sy, sz = (int(v) for v in meta.volume_size(mip))
        self.chunk = (cz, cy, cx)
        self.bounds = Box((oz, oy, ox), (oz + sz, oy + sy, ox + sx))
        self.grid_xyz = tuple(ceildiv(s, c) for s, c in ((sx, cx), (sy, cy), (sz, cz)))
        self.block_size = meta.compressed_segmentation_block_size(mip) or (8, 8, 8)
        self.shards = cv.image.shard_reader(mip) if "sharding" in meta.scale(mip) else None

    def grid(self, box: Box) -> list[tuple[int, int, int]]:
        """Grid points (zyx) of the chunks overlapping ``box``."""
        o, c = self.bounds.start, self.chunk
        lo = [(a - oo) // cc for a, oo, cc in zip(box.start, o, c)]
        hi = [ceildiv(b - oo, cc) for b, oo, cc in zip(box.stop, o, c)]
        return [(z, y, x) for z in range(lo[0], hi[0]) for y in range(lo[1], hi[1]) for x in range(lo[2], hi[2])]

    def chunk_box(self, g: tuple[int, int, int]) -> Box:
        start = tuple(o + gi * c for o, gi, c in zip(self.bounds.start, g, self.chunk))
        return Box(start, tuple(s + c for s, c in zip(start, self.chunk))).intersect(self.bounds)

    def filename(self, g) -> str:
        b = self.chunk_box(g)
        return f"{self.key}/{b.start[2]}-{b.stop[2]}_{b.start[1]}-{b.stop[1]}_{b.start[0]}-{b.stop[0]}"

    def morton(self, grid_zyx: list[tuple[int, int, int]]) -> list[int]:
        from cloudvolume.datasource.precomputed.common import compressed_morton_code
        pts = np.asarray([g[::-1] for g in grid_zyx], dtype=np.uint32).reshape(-1, 3)
        return [int(c) for c in np.atleast_1d(compressed_morton_code(pts, self.grid_xyz))]

    def shard_of(self, g) -> str:
        """The shard file holding chunk ``g`` ("" for unsharded scales)."""
        if self.shards is None:
            return ""
        return self.shards.get_filename(self.morton([g])[0])


class LayerReader:
    """Reads boxes of one layer, every scale, reusing shard indexes and decoded chunks.

    One per worker and layer: ``LayerReader(url).read(box, mip)``. Thread-safe (one read at a
    time).
    """

    def __init__(self, url: str, field_name: str = "source", cache_bytes: int = DEFAULT_CACHE_BYTES):
        self.field = field_name
        self.url, self._info = _read_info(url, field_name)
        self._cv = _open_cv(self.url, 0, field_name, info=self._info)
        self._scales: dict[int, _Scale] = {}
        self._cache: OrderedDict = OrderedDict()
        self._cache_bytes = 0
        self.cache_limit = int(cache_bytes)
        self._lock = threading.RLock()
        self._cf = None
        self._pool = None
        self._shard_index: OrderedDict = OrderedDict()
        self._minishards: OrderedDict = OrderedDict()
        #: store GETs issued (chunks; shard indexes, minishard indexes and data ranges)
        self.requests = 0

    # ------------------------------------------------------------------ geometry
    @property
    def num_scales(self) -> int:
        return len(self._info["scales"])

    def volume_info(self, mip: int = 0) -> VolumeInfo:
        _check_mip(self._info, mip, self.field)
        return _volume_info_from_dict(self._info, int(mip), self.url)

    def _scale(self, mip: int) -> _Scale:
        sc = self._scales.get(mip)
        if sc is None:
            _check_mip(self._info, mip, self.field)
            sc = self._scales[mip] = _Scale(self._cv, int(mip))
        return sc

    def shard_key(self, box: Box, mip: int = 0) -> str:
        """The source shard file that ``box`` starts in ("" when the scale is unsharded): sorting
        blocks by it keeps a worker's reads within one shard at a time."""
        sc = self._scale(mip)
        start = Box(box.start, tuple(a + 1 for a in box.start)).intersect(sc.bounds)
        if sc.shards is None or start.empty:
            return ""
        return sc.shard_of(sc.grid(start)[0])

    # ------------------------------------------------------------------ reading
    def read(self, box: Box, mip: int = 0) -> Cutout:
        """The voxels of ``box`` (zyx, absolute, within the scale's bounds) at scale ``mip``."""
        with self._lock:
            info = self.volume_info(mip)
            start, stop = _check_box(info, box.start, box.stop, "box")
            box = Box(start, stop)
            sc = self._scale(mip)
            grid = sc.grid(box)
            chunks = self._chunks(sc, grid)
            out = np.zeros(box.shape, dtype=np.dtype(info.dtype))
            missing = []
            for g in grid:
                cb = sc.chunk_box(g)
                part = cb.intersect(box)
                arr = chunks[g]
                if arr is None:
                    missing.append(part)
                else:
                    out[part.slices(box.start)] = arr[part.slices(cb.start)]
            return Cutout(out, box, tuple(missing))

    def _chunks(self, sc: _Scale, grid: list) -> dict:
        """Decoded chunks (zyx arrays, or None when absent) for the grid points, LRU first."""
        got, todo = {}, []
        for g in grid:
            key = (sc.mip, g)
            if key in self._cache:
                self._cache.move_to_end(key)
                got[g] = self._cache[key]
            else:
                todo.append(g)
        if todo:
            raw = self._fetch_sharded(sc, todo) if sc.shards is not None else self._fetch_unsharded(sc, todo)
            for g in todo:
                arr = self._decode(sc, g, raw.get(g))
                got[g] = arr
                self._remember((sc.mip, g), arr)
        return got

    def _fetch_unsharded(self, sc: _Scale, grid: list) -> dict:
        return dict(zip(grid, self._get([sc.filename(g) for g in grid])))

    def _fetch_sharded(self, sc: _Scale, grid: list) -> dict:
        """Chunks of a sharded scale: shard index → minishard index → data, each a ranged GET,
        indexes from this reader's LRUs (a chunk absent from its minishard index, or a shard
        file that does not exist, is a missing chunk)."""
        spec, out = sc.shards.spec, {}
        where: dict[tuple[str, int], list] = {}
        for code, g in zip(sc.morton(grid), grid):
            loc = spec.compute_shard_location(code)
            where.setdefault((f"{sc.key}/{loc.shard_number}.shard", int(loc.minishard_number)), []).append((code, g))
        index = self._indexes(sc, sorted({f for f, _ in where}))
        msis = self._minishard_indexes(sc, {(f, m): index[f] for f, m in where if index[f] is not None})
        ranges = []
        for (f, m), items in where.items():
            msi = msis.get((f, m))
            for code, g in items:
                row = None if msi is None else np.flatnonzero(msi[:, 0] == np.uint64(code))
                if row is None or not len(row):
                    out[g] = None
                else:
                    start, size = int(msi[row[0], 1]), int(msi[row[0], 2])
                    ranges.append(({"path": f, "start": start, "end": start + size}, g))
        # adjacent byte ranges of a shard (neighbouring chunks in z-order) are fetched in one GET
        ranges.sort(key=lambda t: (t[0]["path"], t[0]["start"]))
        bundles: list[dict] = []
        for r, g in ranges:
            if bundles and bundles[-1]["path"] == r["path"] and bundles[-1]["end"] == r["start"]:
                bundles[-1]["end"] = r["end"]
                bundles[-1]["parts"].append((r, g))
            else:
                bundles.append(dict(r, parts=[(r, g)]))
        got = self._get([{"path": b["path"], "start": b["start"], "end": b["end"]} for b in bundles])
        pieces = [(g, None if data is None else data[r["start"] - b["start"]:r["end"] - b["start"]])
                  for b, data in zip(bundles, got) for r, g in b["parts"]]
        for g, content in pieces:
            if content is not None and spec.data_encoding != "raw":
                from cloudfiles import compression
                content = compression.decompress(content, spec.data_encoding)
            out[g] = content
        return out

    def _indexes(self, sc: _Scale, files: list[str]) -> dict:
        todo = [f for f in files if f not in self._shard_index]
        n = int(sc.shards.spec.index_length())
        for f, content in zip(todo, self._get([{"path": f, "start": 0, "end": n} for f in todo])):
            self._shard_index[f] = None if not content else sc.shards.decode_index(content, f)
            while len(self._shard_index) > SHARD_INDEXES_KEPT:
                self._shard_index.popitem(last=False)
        return {f: self._shard_index[f] for f in files}

    def _minishard_indexes(self, sc: _Scale, wanted: dict) -> dict:
        out, todo = {}, []
        for (f, m), index in wanted.items():
            a, b = (int(v) for v in index[m])
            if a == b:  # an empty minishard
                continue
            key = (f, a, b)
            if key in self._minishards:
                self._minishards.move_to_end(key)
                out[(f, m)] = self._minishards[key]
            else:
                todo.append(((f, m), key))
        got = self._get([{"path": f, "start": a, "end": b} for _, (f, a, b) in todo])
        for (fm, key), content in zip(todo, got):
            if content:
                out[fm] = self._minishards[key] = sc.shards.decode_minishard_index(content, key[0])
                while len(self._minishards) > MINISHARD_INDEXES_KEPT:
                    self._minishards.popitem(last=False)
        return out

    def _get(self, requests: list) -> list:
        """Contents (None when absent) of ``requests`` (paths, or ``{path, start, end}`` ranges),
        in order. Not through cloud-files' thread queue (it sleeps 0.1 s per call, even for local
        files): local stores are read in this thread, remote ones by this reader's pool of
        FETCH_THREADS, one request per call."""
        from cloudfiles import CloudFiles
        if not requests:
            return []
        if self._cf is None:
            self._cf = CloudFiles(self._cv.meta.cloudpath, progress=False, num_threads=0)
        self.requests += len(requests)

        def fetch(q):  # one request per call: cloud-files runs a single one in this thread
            r = self._cf.get([q], raw=False, raise_errors=False)[0]
            if r.get("error") is not None:
                self._raise(r["error"])
            return r.get("content")

        if self._cf.protocol in ("file", "mem") or len(requests) < 2:
            return self._io(lambda: [fetch(q) for q in requests])
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="chunks")
        return self._io(lambda: list(self._pool.map(fetch, requests)))

    def _decode(self, sc: _Scale, g, content) -> np.ndarray | None:
        if content is None or len(content) == 0:
            return None
        from cloudvolume import chunks
        cb = sc.chunk_box(g)
        shape = cb.shape[::-1] + (int(self._info.get("num_channels", 1)),)
        try:
            arr = chunks.decode(content, sc.encoding, shape=shape, dtype=np.dtype(self._info["data_type"]),
                                block_size=sc.block_size)
        except Exception as exc:  # noqa: BLE001 - a corrupt chunk is the store's, not the request's
            raise StoreError(self.field, f"chunk {sc.filename(g)} of {self.url[:200]} could not be decoded as "
                                         f"{sc.encoding} ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})",
                             "INTERNAL") from exc
        arr = np.asarray(arr)
        if arr.ndim == 4:
            arr = arr[..., 0]
        return np.ascontiguousarray(arr.transpose(2, 1, 0))

    def _remember(self, key, arr) -> None:
        n = 64 if arr is None else arr.nbytes
        self._cache[key] = arr
        self._cache_bytes += n
        while self._cache_bytes > self.cache_limit and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= 64 if old is None else old.nbytes

    def _io(self, fn):
        try:
            return fn()
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated: a store's failure, never the user's
            self._raise(exc)

    def _raise(self, exc: BaseException):
        err = translate_store_error(exc, self.url, self.field)
        if err is None:
            err = StoreError(self.field, f"the store holding {self.url[:200]} failed while reading "
                                         f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
        raise err from (exc if isinstance(exc, BaseException) else None)


class ReaderCache:
    """The last ``max_layers`` readers by layer URL, for long-lived processes (pool workers, the
    server's cutouts)."""

    def __init__(self, max_layers: int = 4):
        self.max_layers = max_layers
        self._readers: OrderedDict[str, LayerReader] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, url: str) -> LayerReader:
        with self._lock:
            reader = self._readers.get(url)
            if reader is None:
                reader = self._readers[url] = LayerReader(url)
                while len(self._readers) > self.max_layers:
                    self._readers.popitem(last=False)
            self._readers.move_to_end(url)
            return reader


def read_zyx(url: str, bbox_zyx_start, bbox_zyx_stop, mip: int = 0, *, fill_missing: bool = False) -> np.ndarray:
    """Read the box ``[start, stop)`` (absolute zyx voxels) of ``url`` at ``mip`` as a (Z, Y, X)
    array, through a one-shot :class:`LayerReader` (workers keep one reader per layer instead).
    With ``fill_missing=False`` a missing chunk is an error (NOT_FOUND naming the chunk's box),
    else its voxels are 0."""
    start = _as_vec3(bbox_zyx_start, "box")
    stop = _as_vec3(bbox_zyx_stop, "box")
    cut = LayerReader(url).read(Box(start, stop), mip)
    if cut.missing and not fill_missing:
        raise SourceNotFound("source", f"{str(url)[:200]}: no chunk holds {cut.missing[0]} at scale {mip} "
                                       "(missing chunks are missing tissue; read them with fill_missing)")
    return cut.data
