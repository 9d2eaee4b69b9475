"""lycotools: adapter and checkpoint tools for Stable Diffusion model files."""

__version__ = "0.1.0"
