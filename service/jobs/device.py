"""The device a worker must run on, checked once at start-up: ``require_device(spec)``.

GPU worker pods (Indexed Jobs and the pool) run with ``EMRESTORE_DEVICE=cuda``: CUDA is then
*required*. A node whose NVIDIA driver is older than the image's CUDA needs, a pod without a GPU
(no ``nvidia.com/gpu`` request, or the device plugin missing), or a wrong ``cuda:N`` must stop the
worker at once with a clear message and exit code 3 (``EXIT_DEVICE_UNAVAILABLE``), never let it run
on the CPU while it holds a GPU. ``auto`` keeps the old behaviour (CUDA when usable, else CPU) and
``cpu`` never touches CUDA.

The worker calls ``require_device_or_exit(os.environ.get("EMRESTORE_DEVICE", "auto"))`` before it
loads a model; the service's diagnose() turns exit code 3 into "could not use its GPU on node …".
"""

from __future__ import annotations

import re

#: the oldest Linux driver each CUDA major version of torch's wheels runs on (NVIDIA's CUDA
#: toolkit release notes, "CUDA Toolkit and Minimum Required Driver Version"; minor-version
#: compatibility covers the rest of the major line)
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
#: exit status of a worker whose required device is unusable (service/jobs/kube/manifest.py)
EXIT_DEVICE_UNAVAILABLE = 3

_SPEC = re.compile(r"^(auto|cpu|cuda(?::([0-9]+))?)$")


class DeviceUnavailable(RuntimeError):
    """The required device cannot be used; the message says why and what to check. A command
    that raises it exits ``EXIT_DEVICE_UNAVAILABLE`` (service/commandline.py reads ``exit_status``)."""
    exit_status = EXIT_DEVICE_UNAVAILABLE


def _driver_hint(torch) -> str:
    cuda = getattr(torch.version, "cuda", None)
    if not cuda:
        return (f"this torch ({torch.__version__}) is a CPU-only build: the worker image must carry "
                "torch's CUDA wheels (deploy/Dockerfile.worker)")
    major = int(str(cuda).split(".")[0])
    need = MIN_DRIVER.get(major)
    return (f"this torch ({torch.__version__}) is built for CUDA {cuda} and needs "
            f"NVIDIA driver >= {need or 'the one its CUDA release notes name'} on the node")


def require_device(spec: str | None, torch_module=None) -> str:
    """Check ``spec`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``) and return the device to use.

    ``cuda``/``cuda:N`` raise :class:`DeviceUnavailable` when CUDA is not usable (driver too old,
    no GPU visible, device index out of range); ``auto`` returns ``cuda`` or ``cpu``; a malformed
    spec raises ValueError naming ``EMRESTORE_DEVICE``.
    """
    text = (spec or "auto").strip()
    m = _SPEC.match(text)
    if m is None:
        raise ValueError(f"EMRESTORE_DEVICE: {text!r} is not auto, cpu, cuda or cuda:N")
    if text == "cpu":
        return "cpu"
    if torch_module is None:
        import torch as torch_module  # noqa: N813 - imported lazily: cpu workers never need it here
    torch = torch_module
    available = bool(torch.cuda.is_available())
    if text == "auto":
        return "cuda" if available else "cpu"
    if not available:
        reason = ""
        try:  # torch says why in the exception of its lazy CUDA initialisation (e.g. driver too old)
            torch.cuda.init()
        except Exception as e:  # noqa: BLE001 - any reason is worth printing
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = reason or "torch.cuda.is_available() is False (no GPU visible to this container)"
        raise DeviceUnavailable(
            f"EMRESTORE_DEVICE={text}: CUDA is required but unavailable: {reason}; {_driver_hint(torch)}; "
            "a GPU pod needs an nvidia.com/gpu request and the NVIDIA device plugin on its node")
    if m.group(2) is not None:
        count = int(torch.cuda.device_count())
        if int(m.group(2)) >= count:
            raise DeviceUnavailable(
                f"EMRESTORE_DEVICE={text}: this container sees {count} CUDA device(s) (0..{count - 1})")
    return text


def require_device_or_exit(spec: str | None) -> str:
    """:func:`require_device` for a process entry point: one ``emrestore: error:`` line and exit 3."""
    try:
        return require_device(spec)
    except (DeviceUnavailable, ValueError) as e:
        from ..commandline import exit_status
        raise SystemExit(exit_status(e)) from None
