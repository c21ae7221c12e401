"""The ``emrestore`` command line: the one command tree (:func:`commands`) and :func:`main`.

The top layer: it imports every layer below and nothing imports it. Engine commands (synth,
train, finetune, restore, models, demo) are here; ``serve`` (service/api/serving.py), the client
commands submit, jobs, cutout, remote-models (service/api/commands.py), ``worker``
(service/jobs/worker_main.py) and the plug-ins of the entry point group ``emrestore.commands``
(the connectors' bridge, view, ng-state) join them in :func:`commands`. How a command is
declared and how errors become exit codes: service/commandline.py. Bad input prints one line
``emrestore: error: CODE: …`` naming the problem, exits 2 and writes nothing.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from .commandline import Command
from .commandline import build_parser as _build_parser
from .commandline import main as _main
from .errors import EmrestoreError


def _ints(text: str, n: int, name: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise EmrestoreError(name, f"expected {n} comma-separated integers, got {text!r}") from None
    if len(vals) != n or min(vals) < 1:
        raise EmrestoreError(name, f"expected {n} comma-separated positive integers, got {text!r}")
    return vals


def _floats(text: str, n: int, name: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise EmrestoreError(name, f"expected {n} comma-separated numbers, got {text!r}") from None
    if len(vals) != n or min(vals) <= 0:
        raise EmrestoreError(name, f"expected {n} comma-separated positive numbers (nm), got {text!r}")
    return vals


def _check_writable(path: str, name: str):
    if "://" in path and not path.startswith("file://"):
        return
    p = path[7:] if path.startswith("file://") else path
    parent = os.path.dirname(os.path.abspath(p)) or "."
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK):
        raise EmrestoreError(name, f"cannot write to {parent}")


# --------------------------------------------------------------------------- synth
def cmd_synth(a):
    from .engine import phantom
    from .volume.tiff import write_stack
    shape = _ints(a.shape, 3, "--shape")
    vx = _floats(a.voxel_size, 3, "--voxel-size") if a.voxel_size else (8.0, 8.0, 8.0)
    if a.anisotropy < 1 or a.anisotropy > 16:
        raise EmrestoreError("--anisotropy", f"must be in [1, 16], got {a.anisotropy}")
    _check_writable(a.out, "--out")
    vol = phantom.make_phantom(shape, seed=a.seed)
    truth = vol
    k = a.anisotropy
    if k > 1:
        out = phantom.thick_sections(vol, k, mode=a.sectioning)
        truth = vol[:(out.shape[0] - 1) * k + 1]
        out_vx = (vx[0], vx[1], vx[2] * k)
    else:
        out, out_vx = vol, vx
    if a.noise:
        out = phantom.add_poisson_gaussian(out, photons=a.noise, seed=a.seed + 1)
    write_stack(a.out, phantom.to_uint8(out), voxel_size_nm=out_vx)
    if a.truth:
        write_stack(a.truth, phantom.to_uint8(truth), voxel_size_nm=vx)
    print(f"wrote {a.out}: {out.shape[0]} sections of {out.shape[1]}×{out.shape[2]} at "
          f"{out_vx[0]:g}×{out_vx[1]:g}×{out_vx[2]:g} nm" + (f"; ground truth {a.truth}" if a.truth else ""))


# --------------------------------------------------------------------------- train
def _voxel_size(a, path):
    from .volume.tiff import read_voxel_size
    if a.voxel_size:
        return _floats(a.voxel_size, 3, "--voxel-size")
    vs = read_voxel_size(path)
    if vs is None:
        raise EmrestoreError("--voxel-size", f"not given and {path} carries no voxel size")
    return vs


def _train_config(a):
    from .engine.training import TrainConfig
    return TrainConfig(steps=a.steps, batch_size=a.batch_size, patch=a.patch, lr=a.lr,
                       warmup=min(a.warmup, max(1, a.steps // 5)), seed=a.seed, device=a.device,
                       checkpoint_every=a.checkpoint_every)


def cmd_train(a):
    from .engine.model import RestorationModel
    from .engine.pairs import IsotropicPairs, RegisteredPairs
    from .engine.tasks import make_task
    from .engine.training import train
    from .volume.tiff import read_stack
    vol = read_stack(a.input)
    vs = _voxel_size(a, a.input)
    if a.task == "isotropic":
        from .engine.pairs import lateral_zoom
        k = a.factor
        if k is None:
            if not a.self_supervised:
                raise EmrestoreError("--factor", "required for supervised isotropic training")
            k = max(2, int(round(vs[2] / min(vs[0], vs[1]))))
        task = make_task("isotropic", k)
        if a.target:
            raise EmrestoreError("--target", "isotropic training learns from --input alone "
                           "(isotropic volume, or anisotropic with --self-supervised)")
        if a.section_thickness and not a.self_supervised:
            raise EmrestoreError("--section-thickness", "only with --self-supervised")
        if a.self_supervised:
            zoom = lateral_zoom(k, vs)  # refuses a factor far from the physical z/xy ratio
            if zoom != 1.0:
                print(f"note: voxel size {vs[0]:g}×{vs[1]:g}×{vs[2]:g} nm, factor {k}: XY sections are "
                      f"resampled ×{zoom:.3f} along the gap axis so the learned gap is the physical one",
                      file=sys.stderr)
        pairs = IsotropicPairs(task, vol, self_supervised=a.self_supervised,
                               voxel_size_nm=vs if a.self_supervised else None,
                               section_thickness=a.section_thickness)
        norm_in = norm_out = pairs.norm
        model_vs = vs if a.self_supervised else (vs[0], vs[1], vs[2] * k)
        mode = "self-supervised" if a.self_supervised else "supervised-isotropic"
    else:
        if a.self_supervised:
            raise EmrestoreError("--self-supervised", f"only for --task isotropic, not {a.task}")
        if not a.target:
            raise EmrestoreError("--target", f"{a.task} training needs a registered --target stack")
        task = make_task(a.task, a.factor or (2 if a.task == "superres" else 1))
        pairs = RegisteredPairs(task, vol, read_stack(a.target))
        norm_in, norm_out = pairs.input_norm, pairs.target_norm
        model_vs = vs
        mode = "supervised"
    _check_writable(a.out, "--out")
    model = RestorationModel.create(task, a.preset, kind=a.kind, voxel_size_nm=model_vs, seed=a.seed)
    model.input_norm, model.target_norm = norm_in, norm_out
    model.learn_gap(model_vs, zoom=getattr(pairs, "zoom", 1.0), section_thickness=bool(a.section_thickness))
    model.name = a.name or os.path.basename(a.out.rstrip("/"))
    if a.resume:
        from .engine.model import read_metadata
        try:
            read_metadata(a.out)
            model = RestorationModel.load(a.out)
        except ValueError:
            pass
    print(f"training {model.kind} {task.name} ×{task.factor} ({a.preset}, "
          f"{model.num_parameters / 1e6:.2f} M parameters) for {a.steps} steps → {a.out}", file=sys.stderr)
    train(model, pairs, _train_config(a), out_url=a.out, resume=a.resume,
          progress=not a.quiet, mode=mode)
    print(f"saved model to {a.out} (final loss {model.training.get('final_loss')})")


def cmd_finetune(a):
    from .engine.model import RestorationModel
    from .engine.pairs import IsotropicPairs, RegisteredPairs, StackGapPairs
    from .engine.training import train
    from .volume.tiff import read_stack
    model = RestorationModel.load(a.model)
    low = read_stack(a.input)
    task = model.task
    if task.name == "isotropic":
        from .volume.tiff import read_voxel_size
        pairs = (StackGapPairs(task, low, read_stack(a.target)) if a.target
                 else IsotropicPairs(task, low, self_supervised=True, voxel_size_nm=read_voxel_size(a.input),
                                     section_thickness=bool(model.gap.get("section_thickness"))))
        model.input_norm = model.target_norm = pairs.norm
    else:
        if not a.target:
            raise EmrestoreError("--target", f"fine-tuning a {task.name} model needs --target")
        pairs = RegisteredPairs(task, low, read_stack(a.target))
        model.input_norm, model.target_norm = pairs.input_norm, pairs.target_norm
    _check_writable(a.out, "--out")
    base = {k: model.training.get(k) for k in ("mode", "steps", "final_loss")}
    base["url"] = a.model
    model.training = {"base": base}
    train(model, pairs, _train_config(a), out_url=a.out, progress=not a.quiet, mode="finetune")
    print(f"saved fine-tuned model to {a.out} (final loss {model.training.get('final_loss')})")


# --------------------------------------------------------------------------- restore
def cmd_restore(a):
    from .engine.model import RestorationModel
    from .engine.restore import UNCERTAINTY_THRESHOLD, restore, validate_request
    from .volume.tiff import read_stack, read_voxel_size, write_stack
    model = RestorationModel.load(a.model)
    vol = read_stack(a.input)
    validate_request(model, vol, a.sampler, a.steps, a.samples, a.estimate)
    vs = _floats(a.voxel_size, 3, "--voxel-size") if a.voxel_size else read_voxel_size(a.input)
    from .engine.restore import check_voxel_size
    check_voxel_size(model, vs)
    if a.uncertainty and a.samples < 2 and not model.has_error_head:
        raise EmrestoreError("--uncertainty", "this model has no error head (saved before it existed); "
                                              "its uncertainty needs --samples of at least 2")
    if os.path.abspath(a.output) == os.path.abspath(a.input):
        raise EmrestoreError("--output", "would overwrite --input")
    _check_writable(a.output, "--output")
    if a.uncertainty:
        _check_writable(a.uncertainty, "--uncertainty")
    from .progress import progress_bar
    bar = progress_bar(desc="restore", unit="img", disable=a.quiet)

    def prog(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    res = restore(model, vol, sampler=a.sampler, steps=a.steps, samples=a.samples, seed=a.seed,
                  tile=a.tile, overlap=a.overlap, device=a.device, progress=prog, estimate=a.estimate,
                  voxel_size_nm=vs, uncertainty=bool(a.uncertainty))
    bar.close()
    out_vs = model.task.output_voxel_size(vs) if vs else None
    write_stack(a.output, res.mean, voxel_size_nm=out_vs)
    if a.uncertainty:
        write_stack(a.uncertainty, res.std.astype(np.float32), voxel_size_nm=out_vs)
    msg = (f"wrote {a.output}: {res.mean.shape[0]} sections of {res.mean.shape[1]}×{res.mean.shape[2]}, "
           f"estimate {res.estimate}, {res.images} images × {res.evaluations} network evaluations "
           f"({res.evaluations_per_voxel} per output voxel), {res.seconds:.1f} s")
    if res.score is not None:
        flag = "NEEDS FINE-TUNING" if res.needs_finetuning else "ok"
        msg += (f"; needs-fine-tuning score {res.score:.2f} (on rows cut from this input the model's "
                f"error is {res.domain_check['error_ratio']:.2f}× what it predicts, relative to its "
                f"training data; flagged above {UNCERTAINTY_THRESHOLD}): {flag}")
    elif a.samples >= 2 or a.uncertainty:
        msg += (f"; needs-fine-tuning score: not available ({model.task.name}: the input holds no "
                f"reference to check the model on)" if model.has_error_head else
                "; needs-fine-tuning score: not available (the model has no error head; retrain it)")
    print(msg)


def cmd_models(a):
    from .engine.model import list_models
    models = list_models(a.dir)
    if not models:
        print(f"no models under {a.dir}")
        return
    print(f"{'name':24} {'task':10} {'factor':>6} {'preset':8} {'steps':>7}  url")
    for m in models:
        print(f"{m['name'][:24]:24} {m['task']:10} {m['factor']:>6} {m['preset']:8} "
              f"{(m.get('training') or {}).get('steps', '-')!s:>7}  {m['url']}")


def cmd_demo(a):
    from .demo import run_demo
    run_demo(a.workdir, quick=a.quick, with_service=not a.no_service, data=a.data)


# --------------------------------------------------------------------------- parser
def _add_train_args(p, default_steps):
    p.add_argument("--steps", type=int, default=default_steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--patch", type=int, default=64, help="training patch size (pixels)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--quiet", action="store_true")


def _synth_arguments(p):
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="61,192,192", help="Z,Y,X of the isotropic phantom")
    p.add_argument("--anisotropy", type=int, default=1, help="thick-section factor k (1: isotropic)")
    p.add_argument("--sectioning", choices=["average", "sample"], default="average")
    p.add_argument("--voxel-size", help="X,Y,Z nm of the isotropic phantom (default 8,8,8)")
    p.add_argument("--noise", type=float, default=0.0, help="photons per unit intensity (0: no noise)")
    p.add_argument("--truth", help="also write the isotropic ground truth here")
    p.add_argument("--seed", type=int, default=0)


def _train_arguments(p):
    p.add_argument("--task", required=True, choices=["denoise", "superres", "isotropic"])
    p.add_argument("--self-supervised", action="store_true",
                   help="isotropic: learn from the anisotropic --input itself (lateral axes)")
    p.add_argument("--input", required=True)
    p.add_argument("--target")
    p.add_argument("--voxel-size", help="X,Y,Z nm (default: from the TIFF)")
    p.add_argument("--factor", type=int)
    p.add_argument("--preset", default="tiny", choices=["tiny", "small", "base"])
    p.add_argument("--kind", default="diffusion", choices=["diffusion", "regression"],
                   help="diffusion: predictor + residual sampler (default); regression: predictor only")
    p.add_argument("--section-thickness", action="store_true",
                   help="isotropic self-supervised: known rows average `factor` rows (sections that "
                        "integrate their thickness, e.g. thick serial sections); off for FIB-SEM / thin slices")
    p.add_argument("--name")
    p.add_argument("--out", required=True, help="model URL (a directory: file://, s3://, gs://, memory://)")
    p.add_argument("--resume", action="store_true")
    _add_train_args(p, 2000)


def _finetune_arguments(p):
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--target")
    p.add_argument("--out", required=True)
    _add_train_args(p, 300)
    p.set_defaults(lr=2e-4)


def _restore_arguments(p):
    from .engine.sampler_names import DEFAULT_SAMPLER, DEFAULT_STEPS, SAMPLER_NAMES
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, choices=SAMPLER_NAMES)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--samples", type=int, default=1,
                   help="K realisations (the mean of K with --estimate sample-mean); K ≥ 2 adds their "
                        "spread to the uncertainty")
    p.add_argument("--estimate", default="mean", choices=["mean", "sample", "sample-mean"],
                   help="mean: posterior mean, 1 evaluation (default, best PSNR); sample: one sharp "
                        "realisation; sample-mean: mean of --samples realisations")
    p.add_argument("--voxel-size", help="X,Y,Z nm of the input (default: from the TIFF); checked against the model")
    p.add_argument("--uncertainty", help="write the per-voxel standard deviation of the output's error here "
                                         "(the model's error head, no extra network evaluations; models "
                                         "without a head need --samples ≥ 2) and run the needs-fine-tuning check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")


def _models_arguments(p):
    p.add_argument("dir", nargs="?", default=os.environ.get("EMRESTORE_MODELS", "models"))



def _demo_arguments(p):
    p.add_argument("--workdir", default="demo-output")
    p.add_argument("--quick", action="store_true", help="a much shorter run (tests)")
    p.add_argument("--no-service", action="store_true", help="skip the precomputed/service part")
    p.add_argument("--data", help="the FlyEM FIB-SEM TIFF, or a directory holding flyem-fibsem/sample1.tif "
                                  "(default: $EMRESTORE_DATA, else ../shared/data beside the checkout)")


ENGINE_COMMANDS = (
    Command("synth", "write a synthetic EM phantom as a TIFF stack", cmd_synth, _synth_arguments),
    Command("train", "train a model", cmd_train, _train_arguments),
    Command("finetune", "fine-tune a model from one image pair", cmd_finetune, _finetune_arguments),
    Command("restore", "restore a TIFF stack", cmd_restore, _restore_arguments),
    Command("models", "list the models in a model directory", cmd_models, _models_arguments),
    Command("demo", "real EM crop (or the phantom) → train tiny model → restore → pictures", cmd_demo,
            _demo_arguments),
)


def commands() -> list[Command]:
    """The command tree: engine, service, client and worker commands, then the plug-ins (the
    functions named by the entry points of the group ``emrestore.commands`` return Commands)."""
    from importlib.metadata import entry_points

    from .api.commands import COMMANDS as CLIENT_COMMANDS
    from .api.serving import SERVE
    from .jobs.worker_main import WORKER
    tree = [*ENGINE_COMMANDS, SERVE, *CLIENT_COMMANDS, WORKER]
    for ep in entry_points(group="emrestore.commands"):  # the connectors' commands (pyproject.toml)
        tree.extend(ep.load()())
    return tree


def build_parser():
    from . import __version__
    return _build_parser(commands(), version=__version__,
                         description="emrestore: diffusion-model restoration for volume electron microscopy "
                                     "(denoise, super-resolution, isotropic z).")


def main(argv: list[str] | None = None) -> int:
    """``emrestore …``: parse, run the command, one error line and the exit status on failure."""
    return _main(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
