"""Neuroglancer: an interactive viewer with a restore-region action.

:class:`RestoreViewer` opens a ``neuroglancer.Viewer`` (the Python package's built-in server,
bound to 127.0.0.1 by default) on a Precomputed source and adds:

- a **restore-region** action bound to ``shift+keyr``: with a box in the annotation layer
  ``"restore region"`` (draw one with the bounding-box tool) it restores that box; without one it
  restores a block (``block_xyz``, default 128×128×8 source voxels) centred on the mouse position
  (or on the view centre when the mouse is not over the data);
- a **next-model** action bound to ``shift+keym`` that cycles through the server's models
  (:meth:`RestoreViewer.set_model` sets one);
- progress in the viewer's status messages (key ``emrestore``), and the restored and
  uncertainty layers added to the viewer when the job succeeds.

``file://`` layers are published to the browser by a small CORS static file server
(:class:`connector.static_server.StaticFileServer`) on 127.0.0.1; the viewer uses
``precomputed://http://127.0.0.1:PORT/…`` sources for them.

State files and links (no viewer needed) are in :mod:`connector.neuroglancer_state`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .neuroglancer_state import (RESULT_LAYER, box_to_units, contrast_from_source, restored_box, restored_shader,
                                 uncertainty_shader)
from .util import ConnectorError, default_output_url, public_url, request_id

log = logging.getLogger(__name__)

__all__ = ["RestoreViewer", "ViewerJob", "run_view", "RESTORE_ACTION", "RESTORE_KEY", "NEXT_MODEL_ACTION",
           "NEXT_MODEL_KEY", "ANNOTATION_LAYER"]

RESTORE_ACTION = "emrestore-restore-region"
RESTORE_KEY = "shift+keyr"
NEXT_MODEL_ACTION = "emrestore-next-model"
NEXT_MODEL_KEY = "shift+keym"
ANNOTATION_LAYER = "restore region"
STATUS_KEY = "emrestore"

_UNIT_NM = {"m": 1e9, "mm": 1e6, "um": 1e3, "µm": 1e3, "nm": 1.0, "pm": 1e-3}


def _scales_nm(dims) -> list[float] | None:
    """The scales of a neuroglancer CoordinateSpace in nm (its units may be m or nm)."""
    if dims is None:
        return None
    try:
        return [float(sc) * _UNIT_NM.get(str(u), 1.0) for sc, u in zip(dims.scales, dims.units)]
    except (AttributeError, TypeError):
        return None


# ----------------------------------------------------------------------------- interactive viewer
@dataclass
class ViewerJob:
    job_id: str
    start_xyz: list[int]
    stop_xyz: list[int]
    model: str
    output: str
    uncertainty: str | None
    state: str = "PENDING"
    message: str = ""
    layers: list[str] = field(default_factory=list)
    error: str | None = None
    restored_box: tuple | None = None


class RestoreViewer:
    """A Neuroglancer viewer on ``source`` with a restore-region action (see module docstring).

    ``server``: HOST:PORT of the gRPC service (or pass ``client``). ``model``: model name (default:
    the first of the server's models). ``output_dir``: where restored layers go (a URL prefix;
    default next to the source). ``samples``/``steps``: sampling settings (samples ≥ 2 also writes
    an uncertainty layer). ``prefix_map``: public URLs for non-file, non-http layers.
    """

    def __init__(self, source: str, server: str = "127.0.0.1:50051", *, model: str | None = None,
                 token: str | None = None, client=None, block_xyz: Sequence[int] = (128, 128, 8),
                 samples: int = 1, steps: int = 0, output_dir: str | None = None,
                 bind_address: str = "127.0.0.1", port: int = 0, prefix_map: Any = None,
                 register_in: list[dict] | None = None, static_server=None):
        import neuroglancer

        from service.volume.stores import normalize_url
        from .static_server import StaticFileServer
        from .util import layer_geometry

        self.source = normalize_url(source[len("precomputed://"):] if source.startswith("precomputed://") else source)
        self.geom = layer_geometry(self.source)
        self.contrast = contrast_from_source(self.source, self.geom)
        if client is None:
            from service.api.client import EmrestoreClient
            client = EmrestoreClient(server, token=token)
        self.client = client
        self.block_xyz = [int(v) for v in block_xyz]
        if len(self.block_xyz) != 3 or min(self.block_xyz) < 1:
            raise ConnectorError("block", f"{list(block_xyz)} must be three positive integers")
        self.samples = int(samples)
        self.steps = int(steps)
        self.output_dir = output_dir
        self.prefix_map = prefix_map
        self.register_in = register_in or []
        self.jobs: list[ViewerJob] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._owns_static = False
        self.static = static_server
        if self.source.startswith("file://") and self.static is None:
            self.static = StaticFileServer(bind_address, 0)
            self._owns_static = True
        if self.static is not None and self.source.startswith("file://"):
            parent = os.path.dirname(self.source[7:].rstrip("/"))
            if self.static.url_for_path(parent) is None:
                self.static.add("data", parent)
            if output_dir and output_dir.startswith("file://"):
                if self.static.url_for_path(output_dir[7:]) is None:
                    os.makedirs(output_dir[7:], exist_ok=True)
                    self.static.add("out", output_dir[7:])
        self.models = self._load_models()
        self.model = model or (self.models[0] if self.models else None)
        if self.model is None:
            raise ConnectorError("model", "the server lists no models; give --model NAME_OR_URL")

        neuroglancer.set_server_bind_address(bind_address, port)
        self.viewer = neuroglancer.Viewer()
        self._setup()

    # ------------------------------------------------------------------ setup
    def _load_models(self) -> list[str]:
        try:
            return [m["name"] for m in self.client.models() if m.get("name")]
        except Exception as e:  # noqa: BLE001 - shown in the status bar
            log.warning("cannot list models: %s", e)
            return []

    def browser_url(self, layer_url: str) -> str:
        """The URL the browser reads ``layer_url`` from (static server for file://)."""
        if layer_url.startswith("file://") and self.static is not None:
            u = self.static.url_for_path(layer_url[7:])
            if u is not None:
                return u
            parent = os.path.dirname(layer_url[7:].rstrip("/"))
            name = f"d{len(self.static._httpd.mounts)}"  # noqa: SLF001
            self.static.add(name, parent)
            return self.static.url_for_path(layer_url[7:])  # type: ignore[return-value]
        return public_url(layer_url, self.prefix_map)

    def _setup(self) -> None:
        import neuroglancer
        g = self.geom
        dims = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=g["resolution_nm_xyz"])
        self.dimensions = dims
        with self.viewer.txn() as s:
            s.dimensions = dims
            s.position = [o + n / 2 for o, n in zip(g["voxel_offset_xyz"], g["size_xyz"])]
            s.layers["source"] = neuroglancer.ImageLayer(source="precomputed://" + self.browser_url(self.source))
            s.layers[ANNOTATION_LAYER] = neuroglancer.LocalAnnotationLayer(dimensions=dims, annotation_color="#00e5ff")
            s.layers[RESULT_LAYER] = neuroglancer.LocalAnnotationLayer(dimensions=dims, annotation_color="#ffd400")
            s.layers[ANNOTATION_LAYER].tool = "annotateBoundingBox"
            s.layout = "4panel"
            s.selected_layer.layer = ANNOTATION_LAYER
        self.viewer.actions.add(RESTORE_ACTION, self._on_restore_action)
        self.viewer.actions.add(NEXT_MODEL_ACTION, self._on_next_model)
        with self.viewer.config_state.txn() as s:
            s.input_event_bindings.viewer[RESTORE_KEY] = RESTORE_ACTION
            s.input_event_bindings.viewer[NEXT_MODEL_KEY] = NEXT_MODEL_ACTION
        self.status(f"emrestore: {RESTORE_KEY.replace('key', '')} restores the box in '{ANNOTATION_LAYER}' "
                    f"(or a {'×'.join(map(str, self.block_xyz))} block at the mouse); model {self.model} "
                    f"({NEXT_MODEL_KEY.replace('key', '')}: next model)")

    @property
    def url(self) -> str:
        return str(self.viewer)

    def status(self, text: str) -> None:
        with self.viewer.config_state.txn() as s:
            s.status_messages[STATUS_KEY] = text

    def bindings(self) -> dict:
        """The viewer's key bindings (proof the action is registered)."""
        return dict(self.viewer.config_state.state.input_event_bindings.viewer.to_json())

    # ------------------------------------------------------------------ models
    def set_model(self, name: str) -> None:
        if self.models and name not in self.models and "://" not in name and not name.startswith("/"):
            raise ConnectorError("model", f"{name!r} is not on the server; choose one of {', '.join(self.models)}")
        self.model = name
        self.status(f"emrestore: model {name}")

    def _on_next_model(self, action_state) -> None:
        self.models = self._load_models() or self.models
        if not self.models:
            self.status("emrestore: the server lists no models")
            return
        i = self.models.index(self.model) if self.model in self.models else -1
        self.set_model(self.models[(i + 1) % len(self.models)])

    # ------------------------------------------------------------------ region
    def _bounds(self) -> tuple[list[int], list[int]]:
        lo = list(self.geom["voxel_offset_xyz"])
        hi = [o + s for o, s in zip(lo, self.geom["size_xyz"])]
        return lo, hi

    def box_from_annotations(self, state=None) -> tuple[list[int], list[int]] | None:
        """The last bounding box of the "restore region" layer, in source voxels (clipped)."""
        state = state if state is not None else self.viewer.state
        try:
            layer = state.layers[ANNOTATION_LAYER]
        except KeyError:
            return None
        boxes = [a for a in getattr(layer, "annotations", []) if getattr(a, "type", "") == "axis_aligned_bounding_box"]
        if not boxes:
            return None
        a = boxes[-1]
        pa, pb = [float(v) for v in a.point_a], [float(v) for v in a.point_b]
        start = [int(math.floor(min(p, q))) for p, q in zip(pa, pb)]
        stop = [int(math.ceil(max(p, q))) for p, q in zip(pa, pb)]
        stop = [max(b, a + 1) for a, b in zip(start, stop)]
        return self._clip(start, stop)

    def block_at(self, centre_xyz: Sequence[float]) -> tuple[list[int], list[int]]:
        """A ``block_xyz`` block centred on ``centre_xyz`` (source voxels), shifted into the bounds."""
        lo, hi = self._bounds()
        start, stop = [], []
        for c, b, l, h in zip(centre_xyz, self.block_xyz, lo, hi):
            b = min(b, h - l)
            s = int(math.floor(c - b / 2))
            s = max(l, min(s, h - b))
            start.append(s)
            stop.append(s + b)
        return start, stop

    def _clip(self, start, stop):
        lo, hi = self._bounds()
        s = [max(a, l) for a, l in zip(start, lo)]
        e = [min(b, h) for b, h in zip(stop, hi)]
        if any(b <= a for a, b in zip(s, e)):
            raise ConnectorError("region", f"the box {start}–{stop} lies outside the source bounds {lo}–{hi}")
        return s, e

    def region_for(self, action_state=None) -> tuple[list[int], list[int], str]:
        """(start, stop, how) of the region the action restores."""
        vs = getattr(action_state, "viewer_state", None) if action_state is not None else None
        box = self.box_from_annotations(vs)
        if box is not None:
            return box[0], box[1], "annotation box"
        mouse = getattr(action_state, "mouse_voxel_coordinates", None) if action_state is not None else None
        if mouse is not None and len(mouse) >= 3:
            s, e = self.block_at(mouse[:3])
            return s, e, "block at the mouse"
        pos = (vs.position if vs is not None and vs.position is not None else self.viewer.state.position)
        s, e = self.block_at(list(pos)[:3])
        return s, e, "block at the view centre"

    # ------------------------------------------------------------------ restoring
    def _on_restore_action(self, action_state) -> None:
        try:
            start, stop, how = self.region_for(action_state)
        except ConnectorError as e:
            self.status(f"emrestore: {e}")
            return
        t = threading.Thread(target=self._run_job, args=(start, stop, how), daemon=True, name="ng-restore")
        with self._lock:
            self._threads.append(t)
        t.start()

    def restore(self, start_xyz: Sequence[int], stop_xyz: Sequence[int], wait: bool = False) -> threading.Thread:
        """Restore a box (source voxels) as the action would; returns the worker thread."""
        start, stop = self._clip(list(start_xyz), list(stop_xyz))
        t = threading.Thread(target=self._run_job, args=(start, stop, "box"), daemon=True, name="ng-restore")
        with self._lock:
            self._threads.append(t)
        t.start()
        if wait:
            t.join()
        return t

    def _outputs(self) -> tuple[str, str | None]:
        rid = request_id()
        if self.output_dir:
            base = self.output_dir.rstrip("/") + "/" + os.path.basename(self.source.rstrip("/"))
            out = f"{base}_restored_{rid}"
            unc = f"{base}_uncertainty_{rid}" if self.samples >= 2 else None
        else:
            out = default_output_url(self.source, rid)
            unc = default_output_url(self.source, rid, "uncertainty") if self.samples >= 2 else None
        return out, unc

    def _run_job(self, start: list[int], stop: list[int], how: str) -> None:
        from service.errors import EmrestoreError
        output, unc = self._outputs()
        box = f"{start}–{stop}"
        self.status(f"emrestore: submitting {how} {box} with model {self.model} …")
        try:
            info = self.client.restore_region(self.source, self.model, output, start, stop, uncertainty=unc,
                                              samples=self.samples, steps=self.steps,
                                              register_in=self.register_in,
                                              labels={"emrestore-origin": "neuroglancer"})
        except EmrestoreError as e:
            self.status(f"emrestore: {e.code}: {e.message}")
            with self._lock:
                self.jobs.append(ViewerJob("", start, stop, str(self.model), output, unc, "FAILED", e.message,
                                           error=f"{e.code}: {e.message}"))
            return
        job = ViewerJob(info.job_id, start, stop, str(self.model), output, unc, info.state, info.message)
        with self._lock:
            self.jobs.append(job)
        short = info.job_id[-8:]

        def progress(u) -> None:
            job.state = u.state
            pct = f"{100 * u.blocks_done / u.blocks_total:.0f}%" if u.blocks_total else ""
            self.status(f"emrestore: job {short} {u.state} {u.blocks_done}/{u.blocks_total} blocks {pct} "
                        f"{('— ' + u.message) if u.message else ''}".rstrip())

        try:
            final = self.client.wait(info.job_id, progress=progress)
        except EmrestoreError as e:
            job.state, job.error = "FAILED", f"{e.code}: {e.message}"
            self.status(f"emrestore: job {short}: {job.error}")
            return
        job.state, job.message = final.state, final.message
        if final.state != "SUCCEEDED":
            job.error = final.message
            self.status(f"emrestore: job {short} {final.state}: {final.message}")
            return
        job.restored_box = self._add_result_layers(job, short)
        if job.restored_box is not None:
            rb = f"{job.restored_box[0]}–{job.restored_box[1]}"
            where = (f"restored region {rb} source voxels" + ("" if rb == box else f" (requested {box}, "
                                                              "snapped to whole output chunks)"))
        else:
            where = f"requested {box}"
        self.status(f"emrestore: job {short} done — added layer 'restored {short}'"
                    + (f" and 'uncertainty {short}'" if unc else "") + f"; {where}; box in '{RESULT_LAYER}'"
                    + f"; z step {self.z_step_nm():g} nm")

    def _add_result_layers(self, job: ViewerJob, short: str) -> tuple[list[int], list[int]] | None:
        """Add the restored (transparent where not written) and uncertainty (alpha overlay) layers,
        a box of the region actually restored, and step z at the output resolution. Returns the
        restored box in source voxels (None when the output cannot be listed)."""
        import neuroglancer
        from .util import layer_geometry
        name = f"restored {short}"
        try:
            out_geom = layer_geometry(job.output)
        except Exception:  # noqa: BLE001
            out_geom = None
        box_out = restored_box(job.output)
        src_res = self.geom["resolution_nm_xyz"]
        box_src = None
        if box_out is not None and out_geom is not None:
            s_, e_ = box_to_units(box_out, out_geom["resolution_nm_xyz"], src_res)
            box_src = ([int(math.floor(v + 1e-6)) for v in s_], [int(math.ceil(v - 1e-6)) for v in e_])
        lo, hi = self.contrast
        with self.viewer.txn() as s:
            s.layers[name] = neuroglancer.ImageLayer(source="precomputed://" + self.browser_url(job.output),
                                                     shader=restored_shader(lo, hi), opacity=1.0)
            job.layers.append(name)
            if job.uncertainty:
                uname = f"uncertainty {short}"
                s.layers[uname] = neuroglancer.ImageLayer(
                    source="precomputed://" + self.browser_url(job.uncertainty),
                    shader=uncertainty_shader(self._uncertainty_max(job.uncertainty)), opacity=0.8)
                job.layers.append(uname)
            if box_src is not None:
                layer = s.layers[RESULT_LAYER]
                layer.annotations.append(neuroglancer.AxisAlignedBoundingBoxAnnotation(
                    id=f"job-{short}", point_a=box_src[0], point_b=box_src[1],
                    description=f"restored by job {short}"))
            if out_geom is not None:
                # step through every generated section: the global z step is the finer resolution
                fine = [min(a, b) for a, b in zip(src_res, out_geom["resolution_nm_xyz"])]
                old = _scales_nm(s.dimensions) or list(src_res)
                if any(abs(f - o) > 1e-6 for f, o in zip(fine, old)):
                    pos = list(s.position) if s.position is not None else None
                    s.dimensions = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units="nm", scales=fine)
                    if pos is not None:
                        s.position = [p * o / f for p, o, f in zip(pos, old, fine)]
            s.selected_layer.layer = name
        return box_src

    def _uncertainty_max(self, url: str) -> float:
        try:
            from .util import layer_geometry
            return 255.0 if layer_geometry(url)["dtype"] == "uint8" else 1.0
        except Exception:  # noqa: BLE001
            return 1.0

    def z_step_nm(self) -> float:
        """The distance one z step moves in the viewer (nm)."""
        return float((_scales_nm(self.viewer.state.dimensions) or self.geom["resolution_nm_xyz"])[2])

    def wait_idle(self, timeout: float = 300.0) -> None:
        """Wait for every started job thread (tests)."""
        t_end = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._threads)
            alive = [t for t in threads if t.is_alive()]
            if not alive:
                return
            left = t_end - time.monotonic()
            if left <= 0:
                raise TimeoutError("emrestore viewer jobs still running")
            alive[0].join(timeout=min(left, 1.0))

    def close(self) -> None:
        try:
            import neuroglancer
            neuroglancer.stop()
        except Exception:  # noqa: BLE001
            pass
        if self._owns_static and self.static is not None:
            self.static.close()


def run_view(source: str, server: str, model: str | None, token: str | None, block_xyz, samples: int,
             steps: int, bind: str, port: int, open_browser: bool, output_dir: str | None,
             stop: Callable[[], bool] | None = None, prefix_map: Any = None) -> None:
    """``emrestore view``: open the viewer and keep serving until interrupted."""
    v = RestoreViewer(source, server, model=model, token=token, block_xyz=block_xyz, samples=samples, steps=steps,
                      bind_address=bind, port=port, output_dir=output_dir, prefix_map=prefix_map)
    print(f"Neuroglancer: {v.url}", flush=True)
    print(f"  {RESTORE_KEY.replace('key', '')}: restore the box in the '{ANNOTATION_LAYER}' annotation layer, "
          f"or a {'×'.join(map(str, v.block_xyz))} block at the mouse; model: {v.model}; "
          f"{NEXT_MODEL_KEY.replace('key', '')}: next model ({', '.join(v.models) or 'none listed'})", flush=True)
    if open_browser:
        import webbrowser
        webbrowser.open(v.url)
    try:
        while not (stop and stop()):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        v.close()
