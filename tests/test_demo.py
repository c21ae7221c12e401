"""The README's demo command end to end (quick mode): engine path and service path."""

import json
import os

from service.cli import main
from service.engine.restore import UNCERTAINTY_THRESHOLD
import torch

# one thread: on a shared 2-core machine two OpenMP threads per process ran 10× slower
torch.set_num_threads(1)


def test_demo_quick(tmp_path):
    wd = tmp_path / "demo"
    assert main(["demo", "--quick", "--workdir", str(wd)]) == 0
    for name in ("anisotropic.tif", "truth.tif", "restored.tif", "uncertainty.tif", "before_after_xz.png",
                 "generated_section_xy.png", "service_before_after_xz.png", "neuroglancer_state.json"):
        assert (wd / name).exists(), name
    rep = json.loads((wd / "report.json").read_text())
    assert rep["service_state"] == "SUCCEEDED"
    assert rep["estimate"] == "mean" and rep["network_evaluations_per_voxel_default"] == 2
    assert rep["network_evaluations_per_image_with_uncertainty"] == 1 + rep["sampler_steps"]
    # the needs-fine-tuning check ran (K ≥ 2, a model with an error head): a factor ≥ 1 and its flag
    assert rep["needs_finetuning_score"] >= 1.0
    assert rep["needs_finetuning"] == (rep["needs_finetuning_score"] > UNCERTAINTY_THRESHOLD)
    state = json.loads((wd / "neuroglancer_state.json").read_text())
    names = [layer["name"] for layer in state["layers"]]
    assert names == ["source", "restored", "uncertainty"]
    assert os.path.exists(wd / "layers" / "em_isotropic" / "info")
