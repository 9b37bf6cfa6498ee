"""clipvqd: language-free text-to-image training (CLIP-VQDiffusion)."""

__version__ = "0.1.0"
