"""emrestore: diffusion-model restoration for volume electron microscopy."""

__version__ = "0.1.0"
