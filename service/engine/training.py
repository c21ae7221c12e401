"""Training and fine-tuning loop (AdamW, warm-up, EMA, gradient clipping, seeds, resume).

Predict-and-refine: the predictor learns the posterior mean with L2; the residual denoiser
learns v-prediction (or the reference's ε-prediction) of the residual around the prediction at
continuous noise levels (``diffusion.ResidualDiffusion``). ``kind="regression"`` trains the
predictor only (the CARE-style baseline).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..progress import progress_bar
from . import cpu_runtime
from .model import RestorationModel, resolve_device


def estimate_residual_scale(task, pairs, patch: int, seed: int, batches: int = 8) -> float:
    """1 / standard deviation of (target − base) over generated pixels: residuals to unit variance."""
    rng = np.random.default_rng(seed + 7919)
    res = []
    for _ in range(batches):
        cond, target = pairs.sample(8, patch, rng)
        cond = torch.from_numpy(cond)
        r = torch.from_numpy(target) - task.base(cond)
        known = task.known(cond)
        res.append(r[known < 0.5] if known is not None else r.reshape(-1))
    std = float(torch.cat(res).std())
    return float(1.0 / max(std, 0.02))


def error_nll(logvar: torch.Tensor, mu: torch.Tensor, target: torch.Tensor,
              weight: torch.Tensor | None) -> torch.Tensor:
    """Gaussian negative log-likelihood of the (detached) mean's error under the predicted
    variance: its minimiser is the expected squared error of the mean at each pixel."""
    err2 = (target.float() - mu.detach().float()) ** 2
    nll = 0.5 * (logvar + err2 * torch.exp(-logvar))
    if weight is None:
        return nll.mean()
    return (nll * weight).sum() / weight.sum().clamp_min(1.0)


def _masked_mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return F.mse_loss(a.float(), b.float())
    return ((a.float() - b.float()) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)


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

    def validate(self):
        if self.steps < 1:
            raise ValueError(f"steps: must be ≥ 1, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be ≥ 1, got {self.batch_size}")
        if self.patch < 16 or self.patch > 1024:
            raise ValueError(f"patch: must be in [16, 1024], got {self.patch}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr: must be in (0, 1), got {self.lr}")


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    # cosine decay to 10 % over the remaining steps
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


class _Pair(torch.nn.Module):
    """Predictor and residual denoiser trained together (one optimizer, one EMA)."""

    def __init__(self, predictor, denoiser):
        super().__init__()
        self.predictor = predictor
        self.denoiser = denoiser


def _rng_state(rng: np.random.Generator) -> str:
    return json.dumps(rng.bit_generator.state)


def _rng_from(state: str) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = json.loads(state)
    return rng


#: weight of the error head's likelihood in the predictor's loss (small: the shared features serve
#: the mean first)
ERROR_HEAD_WEIGHT = 0.1


def training_loss(model, nets: _Pair, cond: torch.Tensor, target: torch.Tensor,
                  gen: torch.Generator) -> torch.Tensor:
    """L2 loss of the predictor (→ posterior mean), the error head's likelihood (when the model
    has one) and the diffusion loss of the residual around the (detached) prediction; all only
    on generated pixels."""
    task, diff = model.task, model.diffusion
    known = task.known(cond)
    weight = None if known is None else (1.0 - known)
    mu, logvar = model.predict(cond, nets.predictor)
    loss = _masked_mse(mu, target, weight)
    if logvar is not None:
        loss = loss + ERROR_HEAD_WEIGHT * error_nll(logvar, mu, target, weight)
    if nets.denoiser is not None:
        mu = mu.detach()
        r0 = diff.encode(target, mu)
        if weight is not None:
            r0 = r0 * weight
        gamma = diff.schedule.sample_gammas(target.shape[0], gen).to(target.device)
        noise = torch.randn(target.shape, generator=gen).to(target.device)
        x = diff.q_sample(r0, noise, gamma)
        out = nets.denoiser(torch.cat([x, cond, mu], 1), gamma)
        loss = loss + _masked_mse(out, diff.target(r0, noise, gamma), weight)
    return loss


def train(model: RestorationModel, pairs, cfg: TrainConfig, out_url: str | None = None,
          resume: bool = False, progress: bool = True, mode: str = "supervised",
          log: list | None = None, stop_at: int | None = None, calibrate: bool = True) -> RestorationModel:
    """Train ``model`` in place on ``pairs`` (an object with ``sample(batch, patch, rng)``).

    The saved and returned weights are the EMA weights. With ``resume`` and a ``train_state.pt``
    at ``out_url``, training continues from its step with the same data order and gives the same
    weights as an uninterrupted run. ``stop_at`` ends this run early at that step (checkpointed),
    for time-limited workers. At the end, diffusion models measure their in-domain spread
    (``model.calibration``, used by the needs-fine-tuning score).
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        cpu_runtime.keep_freed_memory()
    nets = _Pair(model.predictor, model.denoiser).to(device)
    nets.train()
    for p in nets.parameters():  # a model trained before in this process holds its (frozen) EMA copy
        p.requires_grad_(True)
    ema = copy.deepcopy(nets).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    # the tensors are fixed for the whole run (loading a state copies into them): list them once,
    # and update them with one fused / foreach call each instead of a Python loop per tensor
    params, ema_params = list(nets.parameters()), list(ema.parameters())
    buffers, ema_buffers = list(nets.buffers()), list(ema.buffers())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    start = 0
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = list(model.training.get("loss_history", [])) if resume else []
    if resume and out_url:
        state = model.load_train_state(out_url)
        if state is not None:
            nets.load_state_dict(state["nets"])
            ema.load_state_dict(state["ema"])
            opt.load_state_dict(state["opt"])
            start = int(state["step"])
            rng = _rng_from(state["rng"])
            gen.set_state(state["gen"])
            torch.set_rng_state(state["torch_rng"])
            history = [list(h) for h in state.get("history", history)]
            model.diffusion.scale = float(state["scale"])
    if start == 0 and not model.training.get("base"):
        scale = estimate_residual_scale(model.task, pairs, cfg.patch, cfg.seed)
        if model.denoiser is not None:
            model.diffusion.scale = scale
        if model.has_error_head:  # the error head starts at the classical estimate's error
            with torch.no_grad():
                model.predictor.error_head[-1].bias.fill_(float(np.log(1.0 / scale ** 2)))
    use_bf16 = device.type == "cuda"
    bar = progress_bar(cfg.steps, initial=start, disable=not progress, desc=f"train {model.task.name}", unit="step")
    running = None
    t0 = time.time()

    def use(n: _Pair):
        model.predictor, model.denoiser = n.predictor, n.denoiser

    def save(step: int):
        if not out_url:
            return
        use(ema)
        model.training = _record(model, cfg, mode, step, history, time.time() - t0)
        model.save(out_url, train_state={"nets": nets.state_dict(), "ema": ema.state_dict(),
                                         "opt": opt.state_dict(), "step": step, "rng": _rng_state(rng),
                                         "gen": gen.get_state(), "history": history,
                                         "torch_rng": torch.get_rng_state(),
                                         "scale": float(model.diffusion.scale)})
        use(nets)

    def finish(step: int):
        use(ema)
        ema.eval()
        model.training = _record(model, cfg, mode, step, history, time.time() - t0)
        if calibrate and model.denoiser is not None and step >= cfg.steps:
            from .restore import calibrate as _calibrate
            model.calibration = _calibrate(model, pairs, cfg.patch, seed=cfg.seed)
            if out_url:
                model.save(out_url)

    for step in range(start, cfg.steps):
        cond, target = pairs.sample(cfg.batch_size, cfg.patch, rng)
        cond = torch.from_numpy(cond).to(device)
        target = torch.from_numpy(target).to(device)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = training_loss(model, nets, cond, target, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
            for be, b in zip(ema_buffers, buffers):
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
            finish(step + 1)
            return model
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save(step + 1)
    bar.close()
    save(cfg.steps)
    finish(cfg.steps)
    return model


def _record(model, cfg: TrainConfig, mode: str, step: int, history, seconds: float) -> dict:
    rec = {"mode": mode, "steps": step, "config": asdict(cfg), "loss_history": history,
           "final_loss": history[-1][1] if history else None, "seconds": round(seconds, 1)}
    if model.training.get("base"):
        rec["base"] = model.training["base"]  # what a fine-tuned model started from
    return rec
