"""Training and fine-tuning loop (AdamW, warm-up, EMA, gradient clipping, seeds, resume).

Diffusion models learn v-prediction (or the reference's ε-prediction) with MSE at continuous
noise levels; the regression
baseline (``kind="regression"``) learns the target directly with L1 (CARE-style).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .model import RestorationModel
from .tasks import base_prediction


def estimate_residual_scale(task, pairs, patch: int, seed: int, batches: int = 8) -> float:
    """1 / standard deviation of (target − base): scales residuals to unit variance."""
    rng = np.random.default_rng(seed + 7919)
    res = []
    for _ in range(batches):
        cond, target = pairs.sample(8, patch, rng)
        res.append((torch.from_numpy(target) - base_prediction(task, torch.from_numpy(cond))).reshape(-1))
    std = float(torch.cat(res).std())
    return float(1.0 / max(std, 0.02))


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8
    patch: int = 64
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 1e-4
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end
    device: str = "auto"
    residual: bool = True  # diffusion models refine the classical estimate (see tasks.base_prediction)

    def validate(self):
        if self.steps < 1:
            raise ValueError(f"steps: must be ≥ 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be ≥ 1, got {self.batch_size}")
        if self.patch < 16 or self.patch > 1024:
            raise ValueError(f"patch: must be in [16, 1024], got {self.patch}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr: must be in (0, 1), got {self.lr}")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {device} requested but CUDA is not available")
    return torch.device(device)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    # cosine decay to 10 % over the remaining steps
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def train(model: RestorationModel, pairs, cfg: TrainConfig, out_url: str | None = None,
          resume: bool = False, progress: bool = True, mode: str = "supervised",
          log: list | None = None, stop_at: int | None = None) -> RestorationModel:
    """Train ``model`` in place on ``pairs`` (an object with ``sample(batch, patch, rng)``).

    The saved and returned weights are the EMA weights. With ``resume`` and a ``train_state.pt``
    at ``out_url``, training continues from its step with the same data order and gives the same
    weights as an uninterrupted run. ``stop_at`` ends this run early at that step (checkpointed),
    for time-limited workers.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    net = model.net.to(device)
    net.train()
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = list(model.training.get("loss_history", [])) if resume else []
    if resume and out_url:
        state = model.load_train_state(out_url)
        if state is not None:
            net.load_state_dict(state["net"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            start = int(state["step"])
            rng = state["rng"]
            gen.set_state(state["gen"])
            if "torch_rng" in state:
                torch.set_rng_state(state["torch_rng"])
            history = state.get("history", history)
            model.residual_scale = state.get("residual_scale", model.residual_scale)
    if model.kind == "diffusion" and cfg.residual and model.residual_scale is None and start == 0:
        model.residual_scale = estimate_residual_scale(model.task, pairs, cfg.patch, cfg.seed)
    use_bf16 = device.type == "cuda"
    sched = model.schedule
    bar = tqdm(total=cfg.steps, initial=start, disable=not progress, desc=f"train {model.task.name}",
               unit="step", dynamic_ncols=True)
    running = None
    t0 = time.time()

    def save(step: int):
        if not out_url:
            return
        model.net = ema
        model.training = _record(model, cfg, mode, step, history, time.time() - t0)
        model.save(out_url, train_state={"net": net.state_dict(), "ema": ema.state_dict(),
                                         "opt": opt.state_dict(), "step": step, "rng": rng,
                                         "gen": gen.get_state(), "history": history,
                                         "torch_rng": torch.get_rng_state(),
                                         "residual_scale": model.residual_scale})
        model.net = net

    for step in range(start, cfg.steps):
        cond, target = pairs.sample(cfg.batch_size, cfg.patch, rng)
        cond = torch.from_numpy(cond).to(device)
        target = torch.from_numpy(target).to(device)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            if model.kind == "diffusion":
                gamma = sched.sample_gammas(target.shape[0], gen).to(device)
                noise = torch.randn(target.shape, generator=gen).to(device)
                g4 = gamma[:, None, None, None]
                x0 = target
                if model.residual_scale:
                    x0 = (target - base_prediction(model.task, cond)) * model.residual_scale
                sig = torch.sqrt(1 - g4 ** 2)
                noisy = g4 * x0 + sig * noise
                pred = net(torch.cat([noisy, cond], 1), gamma)
                want = g4 * noise - sig * x0 if model.prediction == "v" else noise
                loss = F.mse_loss(pred.float(), want)
            else:
                pred = net(cond)
                loss = F.l1_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
            for be, b in zip(ema.buffers(), net.buffers()):
                be.copy_(b)
        lv = float(loss.detach())
        running = lv if running is None else 0.98 * running + 0.02 * lv
        if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
            history.append([step + 1, round(running, 6)])
        bar.set_postfix(loss=f"{running:.4f}")
        bar.update(1)
        if log is not None:
            log.append(lv)
        if stop_at is not None and step + 1 >= stop_at and step + 1 < cfg.steps:
            save(step + 1)
            bar.close()
            model.net = ema.eval()
            model.training = _record(model, cfg, mode, step + 1, history, time.time() - t0)
            return model
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save(step + 1)
    bar.close()
    save(cfg.steps)
    model.net = ema
    model.training = _record(model, cfg, mode, cfg.steps, history, time.time() - t0)
    ema.eval()
    return model


def _record(model, cfg: TrainConfig, mode: str, step: int, history, seconds: float) -> dict:
    rec = {"mode": mode, "steps": step, "config": asdict(cfg), "loss_history": history,
           "final_loss": history[-1][1] if history else None, "seconds": round(seconds, 1)}
    if model.training.get("base"):
        rec["base"] = model.training["base"]  # what a fine-tuned model started from
    return rec
