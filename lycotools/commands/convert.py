"""`lycotools convert`: adapters, checkpoints and embeddings between the formats users' tools load."""

from __future__ import annotations

import sys

import click

from ..cli_common import batch_options, batch_outputs, common, err, run_batch

ADAPTER_TARGETS = ("kohya", "lycoris", "peft", "diffusers", "comfy")
CHECKPOINT_TARGETS = ("diffusers", "single-file")
EMBEDDING_TARGETS = ("a1111", "kohya", "diffusers", "sdxl")
CONTROL_TARGETS = ("control-lora", "controlnet")
ALL_TARGETS = sorted(set(ADAPTER_TARGETS + CHECKPOINT_TARGETS + EMBEDDING_TARGETS + CONTROL_TARGETS))


@click.command("convert")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--to", "to", type=click.Choice(ALL_TARGETS), default="kohya", show_default=True,
              help="Target format. Adapters: kohya, lycoris, peft, diffusers, comfy. Checkpoints: diffusers, "
                   "single-file. Embeddings: a1111, kohya, diffusers, sdxl. ControlNets: diffusers, single-file, "
                   "control-lora (with --base, --rank). Control-LoRAs: controlnet (with --base). T2I-Adapters: "
                   "diffusers, single-file (TencentARC layout).")
@click.option("-o", "--output", required=True, help="Output file or folder (a folder in batch mode).")
@click.option("--algo", type=click.Choice(["lora"]), default=None,
              help="Adapters: turn LoHa, LoKr, Tucker LoCon, DoRA, full diffs, AdaLoRA into plain LoRA by SVD of ΔW.")
@click.option("--rank", type=int, default=None, help="--algo lora: rank (--mode fixed), or the cap with other modes. "
                                                    "--to control-lora: the rank of every low-rank delta.")
@click.option("--mode", type=click.Choice(["fixed", "threshold", "ratio", "quantile", "energy"]), default="fixed",
              show_default=True, help="--algo lora: per-layer rank rule (as in extract).")
@click.option("--mode-param", type=float, default=None, help="The rank rule's parameter.")
@click.option("--max-rank", type=int, default=None, help="--algo lora: cap on every layer's rank.")
@click.option("--base", default=None, help="Adapters: the checkpoint the adapter is for (needed for DoRA/IA3/OFT "
                                           "to LoRA, and for non-standard models). --to control-lora / --to "
                                           "controlnet: the base checkpoint the deltas are taken against.")
@click.option("--fold-alpha", is_flag=True, help="--to diffusers: bake alpha/rank into the factors (alpha = rank).")
@click.option("--drop-unsupported", is_flag=True, help="Leave out (and report) modules the target cannot hold "
                                                       "instead of refusing the file.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2"]), default=None,
              help="Output dtype of floating-point weights (default: keep; fp16 for --to control-lora).")
@click.option("--allow-nonfinite", is_flag=True,
              help="Adapters: write tensors holding NaN or Inf as they are, with a warning (default: refuse the input, exit 2).")
@click.option("--prune", is_flag=True, help="Checkpoints: drop EMA, optimizer state and training-only keys.")
@click.option("--config", "config", default=None, help="Checkpoints --to diffusers: a diffusers folder whose "
                                                       "configs, tokenizer and scheduler are used.")
@click.option("--prediction", type=click.Choice(["eps", "v"]), default=None,
              help="Checkpoints: the prediction type, for a model that does not say (SD2 512 and 768-v files look "
                   "alike): sets the written scheduler config and modelspec.prediction_type.")
@click.option("--token", default=None, help="Embeddings: the token name to write (default: keep the input's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--report", default=None, help="Adapters and --to control-lora: write the per-layer conversion "
                                             "report as JSON.")
@batch_options("Files converted at once in batch mode.")
@common
def command(inputs, to, output, algo, rank, mode, mode_param, max_rank, base, fold_alpha, drop_unsupported, dtype,
            allow_nonfinite, prune, config, prediction, token, seed, report, overwrite, no_date, jobs, debug, quiet):
    """Convert adapters, checkpoints and embeddings between formats, losslessly where possible.

    What INPUT is (adapter, checkpoint, embedding) is detected; --to picks the format. A conversion that
    loses anything says what and how much; one the target cannot hold is refused (exit 2, no output).

    \b
    Examples:
      lycotools convert my_lora.safetensors --to diffusers -o pytorch_lora_weights.safetensors
      lycotools convert peft_folder/ --to kohya -o my_lora.safetensors
      lycotools convert loha.safetensors --to diffusers --algo lora --rank 16 -o lora.safetensors
      lycotools convert model.safetensors --to diffusers -o model_diffusers/
      lycotools convert model_diffusers/ --to single-file --dtype fp16 --prune -o model.safetensors
      lycotools convert embedding.pt --to diffusers -o learned_embeds.safetensors
      lycotools convert loras/ --to comfy -o comfy_loras/ -j 2
      lycotools convert cn.safetensors --to control-lora --base sd_xl_base.safetensors --rank 128 -o cl.safetensors
      lycotools convert cl.safetensors --to controlnet --base sd_xl_base.safetensors -o cn_full.safetensors
      lycotools convert t2iadapter_canny_sd15v2.pth --to diffusers -o t2i_canny/
    """
    from ..batch import expand_inputs
    from ..ops.convert import ConvertOptions, convert_one

    opts = ConvertOptions(to=to, algo=algo, rank=rank, mode=mode, mode_param=mode_param, max_rank=max_rank, base=base,
                          fold_alpha=fold_alpha, drop_unsupported=drop_unsupported, dtype=dtype, prune=prune,
                          config=config, prediction=prediction, token=token, seed=seed, no_date=no_date,
                          allow_nonfinite=allow_nonfinite)
    items, batch = _expand(inputs, expand_inputs)
    if not items:  # an empty folder or a glob matching nothing: bad input, as in every other command
        err(f"{' '.join(inputs)}: no model files found")
        return 2
    if not batch:
        convert_one(items[0], output, opts, overwrite=overwrite, report_path=report, quiet=quiet)
        return 0
    suffix = "" if to in ("peft",) or (to == "diffusers" and _is_checkpoint_batch(items)) else ".safetensors"
    if to == "a1111":
        suffix = ".pt"

    def work(src, dst):
        rep = None if not report else str(dst.with_suffix(".report.json"))
        convert_one(src, dst, opts, overwrite=overwrite, report_path=rep, quiet=True)

    return run_batch(batch_outputs(items, output, suffix=suffix), work, overwrite=overwrite, jobs=jobs, debug=debug,
                     quiet=quiet, desc="convert")


def _expand(inputs, expand_inputs):
    """Model paths; a folder of PEFT component folders (what --to peft writes) or a diffusers ControlNet folder
    is one input, not a batch."""
    from pathlib import Path

    from ..ops.convert_controlnet import controlnet_folder_weights

    if len(inputs) == 1:
        p = Path(inputs[0])
        if p.is_dir() and any((p / c / "adapter_config.json").exists() for c in ("unet", "text_encoder", "text_encoder_2")):
            return [p], False
        if p.is_dir() and controlnet_folder_weights(p) is not None:
            return [p], False
        from ..ops.convert_t2i import t2i_folder_weights

        if p.is_dir() and t2i_folder_weights(p) is not None:
            return [p], False
    return expand_inputs(inputs)


def _is_checkpoint_batch(items) -> bool:
    from ..ops.convert import input_kind

    try:
        return input_kind(items[0]) == "checkpoint"
    except ImportError:
        raise
    except Exception:
        return False


if __name__ == "__main__":  # pragma: no cover
    command(sys.argv[1:])
