"""Which paths are model files: plain path logic, importable without torch (batch walking, start-up)."""

from __future__ import annotations

from pathlib import Path

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
DIFFUSERS_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")


def is_model_path(path: Path) -> bool:
    """Whether a path looks like something ``open_source`` reads (used when walking folders)."""
    path = Path(path)
    if path.is_dir():
        return (path / "adapter_config.json").exists() or (path / "model_index.json").exists() or any(
            (path / c).is_dir() for c in DIFFUSERS_COMPONENTS
        )
    return path.suffix in PICKLE_SUFFIXES | {".safetensors"} or path.name.endswith(".index.json")
