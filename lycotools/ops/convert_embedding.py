"""``convert`` for textual-inversion embeddings (docs/formats.md#textual-inversion-embeddings), token name kept.

* ``a1111``: ``.pt`` holding plain dicts/tensors only: ``string_to_token {"*": 265}``, ``string_to_param
  {"*": (n, dim)}``, ``name``, ``step``, ``sd_checkpoint``, ``sd_checkpoint_name`` (written with ``torch.save``,
  atomically); A1111 and diffusers take the token from ``name``.
* ``kohya``: safetensors ``{"emb_params": (n, dim)}``;
* ``diffusers``: safetensors ``{token: (n, dim)}`` (``learned_embeds`` format);
* ``sdxl``: safetensors ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``, only from an SDXL embedding.

Formats whose keys do not hold the token keep it in the ``lycotools.token`` metadata; reading, the token is
``--token``, else the file's own (A1111 ``name``, the diffusers key, ``lycotools.token``), else the file stem.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..devices import ADAPTER_DTYPES as DTYPES
from ..errors import BadInput
from ..io.metadata import lycotools_record
from ..io.readers import open_source
from ..io.writer import check_output, save_tensors
from ..layouts.embeddings import detect_embedding



def convert_embedding(path, output, opts, *, overwrite: bool = False) -> dict:
    path, output = Path(path), Path(output)
    check_output(output, [path], overwrite)
    src = open_source(path)
    try:
        info = detect_embedding(src)
        if info is None:
            raise BadInput(path, "not a textual-inversion embedding")
        token = opts.token or info.token or src.metadata.get("lycotools.token") or _stem(path)
        if opts.dtype and opts.dtype not in DTYPES:
            raise BadInput(None, f"--dtype {opts.dtype} is not an embedding dtype; expected fp32, fp16 or bf16")

        def cast(t):
            t = t if t.dim() == 2 else t.reshape(1, -1)
            return t.to(DTYPES[opts.dtype]).contiguous() if opts.dtype else t.contiguous()

        to = opts.to
        record = lycotools_record("convert", [{"role": "input", "name": path.name}],
                                  {"to": to, "token": token, **({"dtype": opts.dtype} if opts.dtype else {})})
        if info.format == "sdxl":
            if to != "sdxl":
                raise BadInput(path, f"an SDXL embedding (clip_l + clip_g) has no --to {to} form",
                               hint="use --to sdxl (A1111, ComfyUI and diffusers' SDXL loaders read it)")
            tensors = {"clip_l": cast(src.get("clip_l")), "clip_g": cast(src.get("clip_g"))}
            save_tensors(output, tensors, dict(record, **{"lycotools.token": token}), inputs=[path],
                         overwrite=overwrite)
            return _result(output, to, token, tensors["clip_l"].shape[0])
        vec = cast(src.get(info.keys["vectors"]))
        if to == "sdxl":
            raise BadInput(path, "this SD1/SD2 embedding has no clip_g (OpenCLIP-G) vectors; an SDXL pair "
                           "cannot be made from it")
        if to == "a1111":
            extras = getattr(src, "extras", {}) or {}
            doc = {
                "string_to_token": {"*": int(extras.get("string_to_token.*", 265))},
                "string_to_param": {"*": vec.clone()},
                "name": token,
                "step": int(extras.get("step", 0) or 0),
                "sd_checkpoint": extras.get("sd_checkpoint") if isinstance(extras.get("sd_checkpoint"), str) else None,
                "sd_checkpoint_name": (extras.get("sd_checkpoint_name")
                                       if isinstance(extras.get("sd_checkpoint_name"), str) else None),
            }
            _torch_save_atomic(doc, output)
        elif to == "kohya":
            save_tensors(output, {"emb_params": vec}, dict(record, **{"lycotools.token": token}), inputs=[path],
                         overwrite=overwrite)
        else:  # diffusers
            save_tensors(output, {token: vec}, record, inputs=[path], overwrite=overwrite)
        return _result(output, to, token, vec.shape[0])
    finally:
        src.close()


def _stem(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def _result(output, fmt, token, n) -> dict:
    return {"output": str(output), "format": fmt, "token": token, "vectors": int(n)}


def _torch_save_atomic(obj, dst: Path):
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".lycotools-tmp", dir=dst.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
