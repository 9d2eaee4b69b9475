"""``convert``: detect what the input is (adapter, checkpoint, embedding) and hand it to its converter.

* adapters: ``convert_adapter`` (kohya / lycoris / peft / diffusers / comfy, ``--algo lora``);
* checkpoints: ``convert_checkpoint`` (single file <-> diffusers folder, dtype, prune, pickle -> safetensors);
* embeddings: ``convert_embedding`` (A1111 ``.pt``, kohya ``emb_params``, diffusers, SDXL ``clip_l``/``clip_g``).
* ControlNets: ``convert_controlnet`` (original <-> diffusers), ``control_lora.extract_control_lora``
  (``--to control-lora --base --rank``); Control-LoRAs: ``control_lora.densify_control_lora`` (``--to controlnet``);
* T2I-Adapters: ``convert_t2i`` (TencentARC original <-> diffusers ``T2IAdapter``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import validate
from ..devices import CHECKPOINT_DTYPES
from ..errors import BadInput
from ..linalg import MODES
from .convert_adapter import ADAPTER_TARGETS, PEFT_COMPONENTS, AdapterOptions, convert_adapter, print_summary

CHECKPOINT_TARGETS = ("diffusers", "single-file")
EMBEDDING_TARGETS = ("a1111", "kohya", "diffusers", "sdxl")


@dataclass
class ConvertOptions:
    to: str = "kohya"
    algo: str | None = None
    rank: int | None = None
    mode: str = "fixed"
    mode_param: float | None = None
    max_rank: int | None = None
    base: str | None = None
    fold_alpha: bool = False
    drop_unsupported: bool = False
    dtype: str | None = None
    prune: bool = False
    config: str | None = None
    prediction: str | None = None  # checkpoints: "eps" | "v", overriding what the model says or leaves open
    token: str | None = None
    seed: int = 0
    no_date: bool = False
    allow_nonfinite: bool = False  # copy NaN/Inf through (a warning) instead of refusing; checkpoints: a cast overflow

    def __post_init__(self):
        validate.lora_rule(self.algo, self.mode, MODES, self.rank, self.max_rank, self.mode_param)
        if self.dtype is not None and self.dtype not in CHECKPOINT_DTYPES:
            raise BadInput(None, f"unknown --dtype {self.dtype!r}; expected one of {', '.join(CHECKPOINT_DTYPES)}")

    def adapter(self) -> AdapterOptions:
        return AdapterOptions(to=self.to, algo=self.algo, rank=self.rank, mode=self.mode, mode_param=self.mode_param,
                              max_rank=self.max_rank, base=self.base, dtype=self.dtype, fold_alpha=self.fold_alpha,
                              drop_unsupported=self.drop_unsupported, seed=self.seed, no_date=self.no_date,
                              allow_nonfinite=self.allow_nonfinite)


def input_kind(path) -> str:
    """'adapter', 'checkpoint', 'controlnet' or 'embedding' (BadInput when it is none of them)."""
    from ..io.readers import open_source
    from ..layouts.adapter_keys import group_keys
    from ..layouts.checkpoint import detect_checkpoint
    from ..layouts.embeddings import detect_embedding

    from .convert_controlnet import controlnet_folder_weights, controlnet_layout

    p = Path(path)
    if p.is_dir() and any((p / c / "adapter_config.json").exists() for c in PEFT_COMPONENTS):
        return "adapter"
    if p.is_dir() and controlnet_folder_weights(p) is not None:
        return "controlnet"
    from .convert_t2i import t2i_folder_weights, t2i_layout

    if p.is_dir() and t2i_folder_weights(p) is not None:
        return "t2i-adapter"
    src = open_source(p)
    try:
        if getattr(src, "kind", None) == "peft":
            return "adapter"
        if detect_embedding(src) is not None:
            return "embedding"
        from .control_lora import is_control_lora, is_unprefixed_controlnet

        if is_control_lora(src.keys()):
            return "control-lora"
        if controlnet_layout(src.keys()) is not None or is_unprefixed_controlnet(src.keys()):
            return "controlnet"
        if t2i_layout(src.keys()) is not None:
            return "t2i-adapter"
        groups = group_keys(src.keys())
        n_adapter = sum(len(s) for s in groups.modules.values())
        if groups.modules and n_adapter >= len(groups.leftovers):
            return "adapter"
        if detect_checkpoint(src.shapes()).arch != "unknown":
            return "checkpoint"
    finally:
        src.close()
    raise BadInput(p, "not an adapter, checkpoint or embedding that lycotools can convert")


def convert_one(path, output, opts: ConvertOptions, *, overwrite: bool = False, report_path=None, quiet: bool = False):
    kind = input_kind(path)
    if kind == "adapter":
        if opts.to not in ADAPTER_TARGETS:
            raise BadInput(path, f"this is an adapter; --to {opts.to} is not an adapter target",
                           hint=f"use one of {', '.join(ADAPTER_TARGETS)}")
        if opts.algo is None and (opts.rank is not None or opts.mode != "fixed" or opts.max_rank is not None):
            raise BadInput(None, "--rank, --mode and --max-rank apply to --algo lora only",
                           hint="add --algo lora to turn the modules into plain LoRA by SVD")
        res = convert_adapter(path, output, opts.adapter(), overwrite=overwrite, report_path=report_path, quiet=quiet)
        if not quiet:
            print_summary(res)
        return res
    if kind == "control-lora":
        from .control_lora import densify_control_lora

        if opts.to != "controlnet":
            raise BadInput(path, f"this is a Control-LoRA; --to {opts.to} is not a Control-LoRA target",
                           hint="use --to controlnet --base BASE (densify into a full ControlNet)")
        return densify_control_lora(path, output, opts, overwrite=overwrite, quiet=quiet)
    if kind == "t2i-adapter":
        from .convert_t2i import convert_t2i

        if opts.to not in CHECKPOINT_TARGETS:
            raise BadInput(path, f"this is a T2I-Adapter; --to {opts.to} is not a T2I-Adapter target",
                           hint="use --to diffusers or --to single-file (the original TencentARC layout)")
        return convert_t2i(path, output, opts, overwrite=overwrite, quiet=quiet)
    if kind == "controlnet":
        from .convert_controlnet import convert_controlnet

        if opts.to == "control-lora":
            from .control_lora import extract_control_lora

            return extract_control_lora(path, output, opts, overwrite=overwrite, report_path=report_path, quiet=quiet)
        if opts.to not in CHECKPOINT_TARGETS:
            raise BadInput(path, f"this is a ControlNet; --to {opts.to} is not a ControlNet target",
                           hint="use --to diffusers, --to single-file (the original layout) or --to control-lora")
        return convert_controlnet(path, output, opts, overwrite=overwrite, quiet=quiet)
    if kind == "checkpoint":
        from .convert_checkpoint import convert_checkpoint

        to = opts.to
        if to not in CHECKPOINT_TARGETS:
            raise BadInput(path, f"this is a checkpoint; --to {to} is not a checkpoint target",
                           hint="use --to diffusers or --to single-file")
        return convert_checkpoint(path, output, opts, overwrite=overwrite, quiet=quiet)
    from .convert_embedding import convert_embedding

    if opts.to not in EMBEDDING_TARGETS:
        raise BadInput(path, f"this is an embedding; --to {opts.to} is not an embedding target",
                       hint=f"use one of {', '.join(EMBEDDING_TARGETS)}")
    res = convert_embedding(path, output, opts, overwrite=overwrite)
    if not quiet:
        import click

        click.echo(f"lycotools: wrote {res['output']} ({res['format']}, token {res['token']!r}, "
                   f"{res['vectors']} vector(s))", err=True)
    return res
