"""The samplers' names and defaults without torch: what request checks (service/jobs/spec.py), the
servicer and the command line need, so that they stay light (a client command or a worker's
argument error does not import torch). samplers.py implements them; restore.py enforces
``MAX_SAMPLES``."""

SAMPLER_NAMES = ("ddim", "ddpm", "dpmpp2m")
#: Default sampler and step count, chosen from bench/quality.py's quality/speed curve.
DEFAULT_SAMPLER = "dpmpp2m"
DEFAULT_STEPS = 10
#: The most samples (realisations) per image a restore takes: the engine's bound and the request limit.
MAX_SAMPLES = 64
