"""Reading source layers as labs store them: one :class:`LayerReader` per worker and layer.

A lab's layer is uint8 jpeg (or raw, png), often sharded (``neuroglancer_uint64_sharded_v1``), at
any chunk size and voxel offset, on file://, s3://, gs:// or an S3-compatible alias, and the
chunks outside the tissue were never written. The reader

- holds the layer's info and, per scale, one shard reader whose shard-index and minishard-index
  caches live in memory (cloud-volume's own ``download`` builds a new shard reader, so a new
  index fetch, for every cutout) and a small LRU of decoded chunks (neighbouring blocks share
  their lateral context), reused across blocks; nothing is cached on disk;
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
        from cloudfiles import CloudFiles
        if self._cf is None:
            self._cf = CloudFiles(self._cv.meta.cloudpath, progress=False)
        names = {sc.filename(g): g for g in grid}
        results = self._io(lambda: self._cf.get(list(names), raw=False, raise_errors=False))
        out = {}
        for r in results:
            if r.get("error") is not None:
                self._raise(r["error"])
            out[names[r["path"]]] = r.get("content")
        return out

    def _fetch_sharded(self, sc: _Scale, grid: list) -> dict:
        reader = sc.shards
        codes = dict(zip(sc.morton(grid), grid))
        data = self._io(lambda: reader.get_data(list(codes), sc.key, progress=False))
        return {codes[c]: v for c, v in data.items()}

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
