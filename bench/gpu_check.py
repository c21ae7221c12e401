"""On a GPU node: the worker's CUDA check, and the base network's per-evaluation time on the GPU.

1. ``require_device("cuda")`` passes where CUDA works; ``cuda:N`` beyond the visible devices and
   a container that sees no GPU (``CUDA_VISIBLE_DEVICES=""``) stop with exit code 3 and one line.
2. Seconds per 256² evaluation of the base preset (k = 5: 6 input, 4 output channels), bf16
   autocast, at batch 1, 8 and 32 tiles — the figure deploy/SCALE.md turns into GPU-hours.

Needs only torch and numpy (run with PYTHONPATH at the repository root):

    python bench/gpu_check.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from service.engine.network import UNet, count_parameters, preset_config  # noqa: E402
from service.jobs.device import DeviceUnavailable, require_device  # noqa: E402


def per_eval_seconds(net, in_ch, tile, batch, repeats=10):
    x = torch.randn(batch, in_ch, tile, tile, device="cuda")
    g = torch.rand(batch, device="cuda")
    with torch.no_grad(), torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        for _ in range(3):
            net(x, g)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            net(x, g)
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats / batch


def main():
    out = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True)
    out["gpu"] = smi.stdout.strip()
    out["require_cuda"] = require_device("cuda")
    try:
        require_device(f"cuda:{torch.cuda.device_count()}")
        out["require_cuda_out_of_range"] = "passed (wrong)"
    except DeviceUnavailable as e:
        out["require_cuda_out_of_range"] = str(e)
    hidden = subprocess.run([sys.executable, "-c", "from service.jobs.device import require_device_or_exit; "
                             "require_device_or_exit('cuda')"], capture_output=True, text=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                            cwd=os.path.join(os.path.dirname(__file__), ".."))
    out["no_gpu_visible"] = {"exit": hidden.returncode, "stderr": hidden.stderr.strip()}
    k, tile = 5, 256
    torch.manual_seed(0)
    net = UNet(preset_config("base", (k - 1) + 2, k - 1)).cuda().eval()
    out["base_parameters_M"] = count_parameters(net) / 1e6
    out["s_per_256_eval_bf16"] = {b: per_eval_seconds(net, (k - 1) + 2, tile, b) for b in (1, 8, 32)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
