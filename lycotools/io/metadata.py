"""Metadata every written file carries: kohya ``ss_*``, SAI ``modelspec.*`` and a ``lycotools.*`` record.

Dates follow ``SOURCE_DATE_EPOCH`` when it is set, and are left out with ``no_date=True``, so the
same inputs and options give the same bytes.
"""

from __future__ import annotations

import json
import os
import time

from .. import __version__

# modelspec architecture names and kohya ss_base_model_version values per architecture
MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
    "sdxl-refiner": "stable-diffusion-xl-v1-refiner",
}
SS_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sd2-v": "sd_v2_v", "sdxl": "sdxl_base_v1-0", "sdxl-refiner": "sdxl_refiner_v1-0"}
RESOLUTION = {"sd1": "512x512", "sd2": "512x512", "sd2-v": "768x768", "sdxl": "1024x1024", "sdxl-refiner": "1024x1024"}
IMPLEMENTATION = {
    "sd1": "diffusers", "sd2": "diffusers", "sd2-v": "diffusers",
    "sdxl": "https://github.com/Stability-AI/generative-models",
    "sdxl-refiner": "https://github.com/Stability-AI/generative-models",
}


def iso_date(no_date: bool = False) -> str | None:
    if no_date:
        return None
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = time.gmtime(int(epoch)) if epoch else time.gmtime()
    return time.strftime("%Y-%m-%dT%H:%M:%S", t)


def modelspec(arch: str | None, kind: str | None, title: str, *, prediction: str | None = None,
              merged_from: list[str] | None = None, no_date: bool = False) -> dict[str, str]:
    """SAI ModelSpec 1.0.1 keys; ``kind`` is e.g. "lora", "lycoris" or None for a checkpoint."""
    meta = {"modelspec.sai_model_spec": "1.0.1", "modelspec.title": title}
    if arch == "sd2" and prediction == "v":
        arch = "sd2-v"
    if arch in MODELSPEC_ARCH:
        base = MODELSPEC_ARCH[arch]
        meta["modelspec.architecture"] = f"{base}/{kind}" if kind else base
        meta["modelspec.implementation"] = IMPLEMENTATION[arch]
        meta["modelspec.resolution"] = RESOLUTION[arch]
        meta["modelspec.prediction_type"] = prediction or ("v" if arch == "sd2-v" else "epsilon")
    meta["modelspec.implementation_version"] = f"lycotools/{__version__}"
    date = iso_date(no_date)
    if date:
        meta["modelspec.date"] = date
    if merged_from:
        meta["modelspec.merged_from"] = ", ".join(merged_from)
    return meta


def network_metadata(arch: str | None, module: str, dim, alpha, args: dict | None = None) -> dict[str, str]:
    """kohya's minimum ``ss_*`` set, which A1111, ComfyUI and kohya's tools read."""
    meta = {
        "ss_network_module": module,
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_v2": str(arch in ("sd2", "sd2-v")),
    }
    if arch in SS_BASE_VERSION:
        meta["ss_base_model_version"] = SS_BASE_VERSION[arch]
    if args:
        meta["ss_network_args"] = json.dumps(args, sort_keys=True)
    return meta


def lycotools_record(command: str, inputs: list[dict], options: dict) -> dict[str, str]:
    """How the file was made: version, command, inputs (names and hashes) and options."""
    return {
        "lycotools.version": __version__,
        "lycotools.command": command,
        "lycotools.inputs": json.dumps(inputs, sort_keys=True),
        "lycotools.options": json.dumps(options, sort_keys=True, default=str),
    }
