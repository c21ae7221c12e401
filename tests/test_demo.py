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
    assert rep["data"] == "phantom"  # the quick demo never reads real data
    # the uncertainty costs no network evaluations beyond the mean's one per view image
    assert rep["network_evaluations_per_image_with_uncertainty"] == 1
    # the needs-fine-tuning check ran with the uncertainty (a model with an error head): a factor ≥ 1 and its flag
    assert rep["needs_finetuning_score"] >= 1.0
    assert rep["needs_finetuning"] == (rep["needs_finetuning_score"] > UNCERTAINTY_THRESHOLD)
    state = json.loads((wd / "neuroglancer_state.json").read_text())
    names = [layer["name"] for layer in state["layers"]]
    assert names == ["source", "restored", "uncertainty"]
    assert os.path.exists(wd / "layers" / "em_isotropic" / "info")


def test_demo_finds_the_real_em_cube_or_says_where_it_looked(tmp_path, monkeypatch):
    """--data takes the TIFF or a directory holding flyem-fibsem/sample1.tif; $EMRESTORE_DATA is such a
    directory; absent data gives None and the place looked at (the demo then uses the phantom)."""
    from service.demo import find_flyem
    tif = tmp_path / "flyem-fibsem" / "sample1.tif"
    tif.parent.mkdir()
    tif.write_bytes(b"II*\x00")
    assert find_flyem(str(tmp_path))[0] == str(tif)
    assert find_flyem(str(tif))[0] == str(tif)
    monkeypatch.setenv("EMRESTORE_DATA", str(tmp_path))
    assert find_flyem()[0] == str(tif)
    missing, looked = find_flyem(str(tmp_path / "elsewhere"))
    assert missing is None and looked == str(tmp_path / "elsewhere" / "flyem-fibsem" / "sample1.tif")
