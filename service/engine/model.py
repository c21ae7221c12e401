"""A restoration model: network + task + schedule + metadata, saved as a self-describing directory.

A model lives at any fsspec URL (file://, s3://, gs://, memory://, or a registered S3-compatible
alias) as a directory with ``model.json`` (everything needed to use it: task, factor, voxel size,
preset, network config, schedule, normalisation, training record, code version) and
``weights.pt`` (EMA weights of the predictor and the residual denoiser). ``train_state.pt`` holds
what resuming training needs; both load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import posixpath
import time
from dataclasses import dataclass, field

import torch

from .. import __version__
from .diffusion import ResidualDiffusion
from .network import UNet, UNetConfig, count_parameters, preset_config
from .normalize import IntensityNorm
from .schedule import NoiseSchedule
from .tasks import Task, make_task

FORMAT = "emrestore-model"
#: 2: predict-and-refine (predictor + residual denoiser), row-filling isotropic design.
FORMAT_VERSION = 2
KINDS = ("diffusion", "regression")
#: range of the error head's log-variance (normalised units; −12 … 4 is a std of 0.0025 … 7.4)
LOGVAR_RANGE = (-12.0, 4.0)


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device} requested but CUDA is not available")
    return torch.device(device)


def open_fs(url: str):
    """(filesystem, path) for a URL; registered S3-compatible aliases included."""
    from ..volume.stores import open_fs as _open
    return _open(url)


class ModelError(ValueError):
    """A model that cannot be read or used for the request (e.g. model/task mismatch)."""
    code = "FAILED_PRECONDITION"  # the gRPC status (service.errors.status_of)


class ModelNotFound(ModelError):
    """No model at the URL."""
    code = "NOT_FOUND"


@dataclass
class RestorationModel:
    """Predictor (L2 regression → posterior mean, one evaluation) plus, for ``kind="diffusion"``,
    a denoiser that samples the residual around the prediction (``diffusion`` owns the process).

    ``denoiser`` is the residual denoiser (None for ``kind="regression"``).
    """
    task: Task
    predictor: UNet
    denoiser: UNet | None
    preset: str
    kind: str = "diffusion"
    diffusion: ResidualDiffusion = field(default_factory=ResidualDiffusion)
    voxel_size_nm: tuple[float, float, float] | None = None
    input_norm: IntensityNorm | None = None
    target_norm: IntensityNorm | None = None
    training: dict = field(default_factory=dict)
    name: str = ""
    #: the error head's calibration on the training data, measured after training (restore.calibrate;
    #: the needs-fine-tuning check, restore.domain_check, compares against it)
    calibration: dict = field(default_factory=dict)
    #: isotropic: the geometry the model learned (physical z/xy ratio, lateral zoom, thickness)
    gap: dict = field(default_factory=dict)

    def learn_gap(self, voxel_size_nm, zoom: float = 1.0, section_thickness: bool = False) -> None:
        """Isotropic models: record the geometry they learn from data of ``voxel_size_nm`` (x, y, z)
        — rows z/k apart at the lateral pixel size — so restoring data of another z/xy ratio is
        refused (:func:`gap_mismatch`)."""
        if self.task.name != "isotropic" or voxel_size_nm is None:
            return
        vx, vy, vz = (float(v) for v in voxel_size_nm)
        self.gap = {"row_spacing_nm": vz / self.task.factor, "lateral_nm": min(vx, vy),
                    "zoom": float(zoom), "section_thickness": bool(section_thickness)}

    @classmethod
    def create(cls, task: Task, preset: str = "tiny", kind: str = "diffusion",
               voxel_size_nm=None, seed: int = 0, error_head: bool = True,
               **unet_overrides) -> "RestorationModel":
        """A new model. ``error_head``: the predictor also outputs the log-variance of its own
        error per pixel (trained with a Gaussian likelihood on the detached mean), the
        uncertainty map of diffusion models with the samples' spread (:attr:`has_error_head`)."""
        if kind not in KINDS:
            raise ValueError(f"kind: must be one of {KINDS}, got {kind!r}")
        torch.manual_seed(seed)
        pcfg = preset_config(preset, task.cond_channels, task.out_channels, noise_conditioned=False,
                             error_head=error_head and kind == "diffusion", **unet_overrides)
        predictor = UNet(pcfg)
        # the predictor starts as the classical estimate (its correction is zero) and improves on it
        torch.nn.init.zeros_(predictor.out[-1].weight)
        torch.nn.init.zeros_(predictor.out[-1].bias)
        denoiser = None
        if kind == "diffusion":
            dcfg = preset_config(preset, task.out_channels + task.cond_channels + task.out_channels,
                                 task.out_channels, noise_conditioned=True, **unet_overrides)
            denoiser = UNet(dcfg)
        return cls(task=task, predictor=predictor, denoiser=denoiser, preset=preset, kind=kind,
                   voxel_size_nm=tuple(voxel_size_nm) if voxel_size_nm else None)

    @property
    def has_error_head(self) -> bool:
        """True when the predictor also predicts its error's log-variance (models saved before
        the error head have one output channel: their uncertainty is the samples' spread)."""
        return self.predictor.config.error_head

    # compatibility views
    @property
    def schedule(self) -> NoiseSchedule:
        return self.diffusion.schedule

    @property
    def networks(self) -> dict[str, UNet]:
        nets = {"predictor": self.predictor}
        if self.denoiser is not None:
            nets["denoiser"] = self.denoiser
        return nets

    def to(self, device) -> "RestorationModel":
        for n in self.networks.values():
            n.to(device)
        return self

    def eval(self) -> "RestorationModel":
        for n in self.networks.values():
            n.eval()
        return self

    @property
    def num_parameters(self) -> int:
        return sum(count_parameters(n) for n in self.networks.values())

    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "kind": self.kind,
            "task": self.task.name,
            "factor": self.task.factor,
            "preset": self.preset,
            "predictor_unet": self.predictor.config.to_dict(),
            "unet": self.denoiser.config.to_dict() if self.denoiser is not None else None,
            "num_parameters": self.num_parameters,
            "diffusion": self.diffusion.to_dict(),
            "voxel_size_nm": list(self.voxel_size_nm) if self.voxel_size_nm else None,
            "input_norm": self.input_norm.to_dict() if self.input_norm else None,
            "target_norm": self.target_norm.to_dict() if self.target_norm else None,
            "training": self.training,
            "calibration": self.calibration,
            "gap": self.gap,
            "code_version": __version__,
            "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    # ------------------------------------------------------------------ storage
    def state_dict(self) -> dict:
        return {f"{name}.{k}": v.detach().cpu()
                for name, n in self.networks.items() for k, v in n.state_dict().items()}

    def save(self, url: str, train_state: dict | None = None) -> str:
        fs, path = open_fs(url)
        fs.makedirs(path, exist_ok=True)
        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        fs.pipe_file(posixpath.join(path, "weights.pt"), buf.getvalue())
        if train_state is not None:
            buf = io.BytesIO()
            torch.save(train_state, buf)
            fs.pipe_file(posixpath.join(path, "train_state.pt"), buf.getvalue())
        # model.json last: its presence marks a complete model
        fs.pipe_file(posixpath.join(path, "model.json"),
                     json.dumps(self.metadata(), indent=2).encode())
        return url

    @classmethod
    def load(cls, url: str, device: str | torch.device = "cpu") -> "RestorationModel":
        meta = read_metadata(url)
        fs, path = open_fs(url)
        try:
            state = torch.load(io.BytesIO(fs.cat_file(posixpath.join(path, "weights.pt"))),
                               map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ModelError(f"model: {url} has model.json but no weights.pt") from None
        except Exception as e:  # noqa: BLE001 - any unpickling failure is one line for the user
            raise ModelError(f"model: {url}/weights.pt cannot be read safely ({type(e).__name__})") from None
        predictor = UNet(UNetConfig.from_dict(meta["predictor_unet"]))
        denoiser = UNet(UNetConfig.from_dict(meta["unet"])) if meta.get("unet") else None
        try:
            predictor.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("predictor.")})
            if denoiser is not None:
                denoiser.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("denoiser.")})
        except RuntimeError:
            raise ModelError(f"model: {url}/weights.pt does not match its model.json") from None
        m = cls(task=make_task(meta["task"], int(meta["factor"])), predictor=predictor, denoiser=denoiser,
                preset=meta["preset"], kind=meta.get("kind", "diffusion"),
                diffusion=ResidualDiffusion.from_dict(meta["diffusion"]),
                voxel_size_nm=tuple(meta["voxel_size_nm"]) if meta.get("voxel_size_nm") else None,
                input_norm=IntensityNorm.from_dict(meta["input_norm"]) if meta.get("input_norm") else None,
                target_norm=IntensityNorm.from_dict(meta["target_norm"]) if meta.get("target_norm") else None,
                training=meta.get("training", {}), name=meta.get("name", ""),
                calibration=meta.get("calibration") or {}, gap=meta.get("gap") or {})
        return m.to(device).eval()

    def load_train_state(self, url: str) -> dict | None:
        """The resume state (tensors, numbers, strings only: read with ``weights_only=True``)."""
        fs, path = open_fs(url)
        p = posixpath.join(path, "train_state.pt")
        if not fs.exists(p):
            return None
        try:
            return torch.load(io.BytesIO(fs.cat_file(p)), map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001
            raise ModelError(f"resume: {url}/train_state.pt was written by an older emrestore and "
                             f"cannot be read safely; train again without --resume") from None


def read_metadata(url: str) -> dict:
    """model.json of a model directory; ModelError naming the URL when absent or not a model."""
    try:
        fs, path = open_fs(url)
        raw = fs.cat_file(posixpath.join(path, "model.json"))
    except FileNotFoundError:
        raise ModelNotFound(f"model: no model at {url} (model.json not found)") from None
    except ValueError as e:
        raise ModelError(f"model: cannot open {url}: {e}") from None
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise ModelError(f"model: {url}/model.json is not valid JSON") from None
    if meta.get("format") != FORMAT:
        raise ModelError(f"model: {url} is not an emrestore model (format={meta.get('format')!r})")
    version = int(meta.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise ModelError(f"model: {url} has format_version {version}; this code reads up to {FORMAT_VERSION}")
    if version < FORMAT_VERSION:
        raise ModelError(f"model: {url} was saved by an earlier emrestore (format {version}: sample-only "
                         f"output, plane-pair isotropic design); train it again with this version")
    return meta


def list_models(url: str) -> list[dict]:
    """Models directly below a directory URL: their metadata plus ``url``, sorted by name."""
    fs, path = open_fs(url)
    out = []
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    for e in entries:
        if e.get("type") != "directory":
            continue
        p = e["name"].rstrip("/")
        if fs.exists(posixpath.join(p, "model.json")):
            sub = url.rstrip("/") + "/" + posixpath.basename(p)
            try:
                meta = read_metadata(sub)
            except ModelError:
                continue
            meta["url"] = sub
            meta.setdefault("name", posixpath.basename(p))
            if not meta["name"]:
                meta["name"] = posixpath.basename(p)
            out.append(meta)
    return sorted(out, key=lambda m: m["name"])


def gap_mismatch(task: str, factor: int, gap: dict | None, voxel_size_nm) -> str | None:
    """Why data of ``voxel_size_nm`` (x, y, z) does not fit an isotropic model's learned gap, or None.

    Works on a model's metadata, so the service can refuse a job before anything is written."""
    if task != "isotropic" or voxel_size_nm is None or not (gap or {}).get("row_spacing_nm"):
        return None
    vx, vy, vz = (float(v) for v in voxel_size_nm)
    want = gap["row_spacing_nm"] / gap["lateral_nm"]
    got = (vz / factor) / min(vx, vy)
    if abs(got / want - 1.0) <= 0.1:
        return None
    return (f"input {vx:g}×{vy:g}×{vz:g} nm gives rows {got:.2f}× the lateral pixel at factor {factor}; "
            f"the model learned {want:.2f}× — train or fine-tune on this data")
