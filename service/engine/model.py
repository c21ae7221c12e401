"""A restoration model: network + task + schedule + metadata, saved as a self-describing directory.

A model lives at any fsspec URL (file://, s3://, gs://, memory://, or a registered S3-compatible
alias) as a directory with ``model.json`` (everything needed to use it: task, factor, voxel size,
preset, network config, schedule, normalisation, training record, code version) and
``weights.pt`` (EMA weights). ``train_state.pt`` holds what resuming training needs.
"""

from __future__ import annotations

import io
import json
import posixpath
import time
from dataclasses import dataclass, field

import torch

from .. import __version__
from .network import UNet, UNetConfig, count_parameters, preset_config
from .normalize import IntensityNorm
from .schedule import NoiseSchedule
from .tasks import TaskSpec

FORMAT = "emrestore-model"
FORMAT_VERSION = 1
KINDS = ("diffusion", "regression")


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
    task: TaskSpec
    net: UNet
    preset: str
    kind: str = "diffusion"
    schedule: NoiseSchedule = field(default_factory=NoiseSchedule)
    voxel_size_nm: tuple[float, float, float] | None = None
    input_norm: IntensityNorm | None = None
    target_norm: IntensityNorm | None = None
    training: dict = field(default_factory=dict)
    name: str = ""
    #: Residual diffusion: the network generates (target − base)·residual_scale, where base is the
    #: classical estimate (``tasks.base_prediction``). None: it generates the target itself.
    residual_scale: float | None = None
    #: What the network predicts: "v" (v = γ·ε − sqrt(1−γ²)·x0, stable at every noise level, good
    #: for few-step sampling) or "eps" (the reference's ε-prediction).
    prediction: str = "v"

    @classmethod
    def create(cls, task: TaskSpec, preset: str = "tiny", kind: str = "diffusion",
               voxel_size_nm=None, seed: int = 0, **unet_overrides) -> "RestorationModel":
        if kind not in KINDS:
            raise ValueError(f"kind: must be one of {KINDS}, got {kind!r}")
        noisy = task.out_channels if kind == "diffusion" else 0
        cfg = preset_config(preset, noisy + task.cond_channels, task.out_channels,
                            noise_conditioned=(kind == "diffusion"), **unet_overrides)
        torch.manual_seed(seed)
        return cls(task=task, net=UNet(cfg), preset=preset, kind=kind,
                   voxel_size_nm=tuple(voxel_size_nm) if voxel_size_nm else None)

    def x0_from_output(self, out: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        """The network's output at noisy sample x and level gamma → predicted clean sample."""
        g = gamma.reshape(-1, 1, 1, 1).to(out.dtype)
        s = torch.sqrt((1 - g * g).clamp_min(0))
        if self.prediction == "v":
            return g * x - s * out
        return (x - s * out) / g.clamp_min(1e-4)

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.net)

    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "kind": self.kind,
            "task": self.task.name,
            "factor": self.task.factor,
            "preset": self.preset,
            "unet": self.net.config.to_dict(),
            "num_parameters": self.num_parameters,
            "schedule": self.schedule.to_dict(),
            "voxel_size_nm": list(self.voxel_size_nm) if self.voxel_size_nm else None,
            "input_norm": self.input_norm.to_dict() if self.input_norm else None,
            "target_norm": self.target_norm.to_dict() if self.target_norm else None,
            "training": self.training,
            "residual_scale": self.residual_scale,
            "prediction": self.prediction,
            "code_version": __version__,
            "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    # ------------------------------------------------------------------ storage
    def save(self, url: str, train_state: dict | None = None) -> str:
        fs, path = open_fs(url)
        fs.makedirs(path, exist_ok=True)
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in self.net.state_dict().items()}, buf)
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
        cfg = UNetConfig.from_dict(meta["unet"])
        net = UNet(cfg)
        net.load_state_dict(state)
        net.to(device).eval()
        m = cls(task=TaskSpec(meta["task"], int(meta["factor"])), net=net, preset=meta["preset"],
                kind=meta.get("kind", "diffusion"),
                schedule=NoiseSchedule.from_dict(meta["schedule"]),
                voxel_size_nm=tuple(meta["voxel_size_nm"]) if meta.get("voxel_size_nm") else None,
                input_norm=IntensityNorm.from_dict(meta["input_norm"]) if meta.get("input_norm") else None,
                target_norm=IntensityNorm.from_dict(meta["target_norm"]) if meta.get("target_norm") else None,
                training=meta.get("training", {}), name=meta.get("name", ""),
                residual_scale=meta.get("residual_scale"), prediction=meta.get("prediction", "eps"))
        return m

    def load_train_state(self, url: str) -> dict | None:
        fs, path = open_fs(url)
        p = posixpath.join(path, "train_state.pt")
        if not fs.exists(p):
            return None
        return torch.load(io.BytesIO(fs.cat_file(p)), map_location="cpu", weights_only=False)


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
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelError(f"model: {url} has format_version {meta['format_version']}; this code reads up to {FORMAT_VERSION}")
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
