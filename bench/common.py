"""Shared pieces of the benchmarks: data, baselines, tables, machine description."""

from __future__ import annotations

import datetime as dt
import os
import platform
import time

import numpy as np
from scipy.interpolate import CubicSpline

ISBI_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "isbi2012")
OUT_DIR = os.path.join(os.path.dirname(__file__), "results")


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), {dev}, torch {torch.__version__}"


def today() -> str:
    return dt.date.today().isoformat()


def isbi_stacks():
    """(train, test) ISBI 2012 stacks as (Z, Y, X) uint8, or None when the data is absent."""
    from service.volume.tiff import read_stack
    tr = os.path.join(ISBI_DIR, "train-volume.tif")
    te = os.path.join(ISBI_DIR, "test-volume.tif")
    if not (os.path.exists(tr) and os.path.exists(te)):
        return None
    return read_stack(tr), read_stack(te)


def linear_interp(stack: np.ndarray, k: int) -> np.ndarray:
    from service.demo import linear_interp as li
    return li(stack, k)


def cubic_interp(stack: np.ndarray, k: int) -> np.ndarray:
    """Cubic spline through the sections along axis 0, at the restored positions."""
    z = np.arange(stack.shape[0]) * k
    cs = CubicSpline(z, stack.astype(np.float64), axis=0)
    return cs(np.arange((stack.shape[0] - 1) * k + 1)).astype(np.float32)


def table(headers: list[str], rows: list[list], title: str = "") -> str:
    """A Markdown table."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}"
        return str(v)
    lines = [f"### {title}", ""] if title else []
    lines.append("| " + " | ".join(headers) + " |")
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for r in rows:
        lines.append("| " + " | ".join(fmt(v) for v in r) + " |")
    return "\n".join(lines) + "\n"


def write_report(name: str, text: str) -> str:
    os.makedirs(OUT_DIR, exist_ok=True)
    path = os.path.join(OUT_DIR, f"{name}.md")
    header = f"<!-- written by bench/{name}.py on {today()}; machine: {machine()} -->\n"
    with open(path, "w") as f:
        f.write(header + text)
    print(text)
    print(f"[bench] wrote {path}")
    return path


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
