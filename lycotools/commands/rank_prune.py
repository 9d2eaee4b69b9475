"""`lycotools rank-prune`: shrink adapters to a rank, a per-layer rule or a global budget."""

from __future__ import annotations

import click

from ..cli_common import batch_options, batch_outputs, common, err, run_batch

HELP = """Shrink adapters to a uniform rank, a per-layer rule or a global parameter budget.

\b
Every module's ΔW is put in exact SVD form (LoRA/LoCon/AdaLoRA and LoHa without forming the
out×in matrix: QR of both factors and an SVD of the r×r core; LoKr from the SVDs of its two
Kronecker blocks; Tucker and full diffs are materialised) and written back as a kohya LoRA/LoCon with one alpha (the largest new rank)
and each layer's old scale folded into its factors, so every layer keeps its effective
strength. A rank ≥ the input's reproduces ΔW to fp32 rounding.

\b
--mode uses kohya resize_lora's quantities without its off-by-one: ratio t keeps every
S_i > S_max/t; cumulative t and fro t give the SMALLEST rank keeping a fraction t of ΣS /
of the Frobenius norm (kohya returns one more, and never fewer than 2); energy t keeps a
fraction t of ΣS² (= fro √t).

\b
--budget spends a whole-file parameter count (2.5M, 300k), size (20MB, at the output dtype)
or ratio of the input (0.5) where it matters: --score spectral (default) ranks every singular
triplet of every layer by σ² per parameter (most Frobenius energy of the whole model per
parameter); --score sensitivity is AdaLoRA's data-driven score (|w·∂L/∂w|, EMA sensitivity ×
uncertainty, β1=β2=0.85, Eq. 9 triplet score) from a few diffusion-loss passes on --calib
images+captions (or --prompts with noise latents) through the --base model.

\b
An output with more parameters than its input is refused (exit 2) unless --allow-larger: a
LoKr, LoHa or full module becomes a LoRA of r·(out + in) parameters per layer, often many
times its Kronecker/Hadamard factors. A file keeping under 50% of ΔW's energy (relative
error above 0.71) is written with a warning naming it, its sizes and the energy kept.

\b
Examples:
  lycotools rank-prune my_lora.safetensors -o my_lora_r8.safetensors --rank 8
  lycotools rank-prune my_lora.safetensors -o small.safetensors --budget 0.5 --report r.json --plot r.png
  lycotools rank-prune my_lora.safetensors -o dyn.safetensors --mode fro --mode-param 0.9 --max-rank 32
  lycotools rank-prune loras/ -o pruned/ --budget 20MB -j 2
  lycotools rank-prune l.safetensors -o s.safetensors --budget 0.3 --score sensitivity \\
      --base v1-5.safetensors --calib calib_images/ --config sd15_diffusers/
"""


@click.command("rank-prune", help=HELP)
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Output file (a folder with several inputs).")
@click.option("--rank", type=int, default=None, help="Uniform rank for every layer.")
@click.option("--mode", type=click.Choice(["ratio", "cumulative", "fro", "energy"]), default=None,
              help="Per-layer rank rule (kohya's definitions, without its off-by-one).")
@click.option("--mode-param", type=float, default=None, help="Parameter of --mode (ratio: S_max/S_min; others: a fraction).")
@click.option("--budget", default=None, help="Global budget: parameters (2.5M), size (20MB) or ratio of the input (0.5).")
@click.option("--score", type=click.Choice(["spectral", "sensitivity"]), default="spectral", show_default=True,
              help="How --budget ranks singular triplets.")
@click.option("--min-rank", type=int, default=None, help="Smallest rank a layer keeps (default 1 for --rank/--mode, 0 for --budget).")
@click.option("--max-rank", type=int, default=None, help="Largest rank a layer gets.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default=None, help="Output dtype (default: the input's).")
@click.option("--base", default=None, help="Base checkpoint: true layer shapes, and the model for --score sensitivity.")
@click.option("--calib", default=None, help="Folder of images with .txt captions for --score sensitivity.")
@click.option("--prompts", multiple=True, help="Prompt(s) for --score sensitivity with generated noise latents (repeatable).")
@click.option("--config", "config", default=None, help="Diffusers folder (unet/, text_encoder/, tokenizer/, vae/ configs) that builds the --base model for "
                   "--score sensitivity (default: --base itself when it is a diffusers folder).")
@click.option("--steps", type=int, default=8, show_default=True, help="Forward/backward passes for --score sensitivity.")
@click.option("--device", default="cpu", show_default=True, help="Device for --score sensitivity (cpu, cuda).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed (randomized SVDs, timesteps, noise).")
@click.option("--allow-nonfinite", is_flag=True,
              help="Copy modules holding NaN or Inf unpruned, with a warning (default: refuse the input, exit 2).")
@click.option("--allow-larger", is_flag=True,
              help="Write the output even when it has more parameters than the input (refused by default, exit 2).")
@click.option("--report", default=None, help="Write per-layer rank before/after and energy kept as JSON.")
@click.option("--plot", default=None, help="Draw rank per layer before/after, grouped by block, as PNG (needs matplotlib).")
@batch_options()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@common
def command(inputs, output, rank, mode, mode_param, budget, score, min_rank, max_rank, dtype, base, calib, prompts,
            config, steps, device, seed, allow_nonfinite, report, plot, no_date, overwrite, jobs, as_json, debug, quiet, allow_larger):
    import json
    from pathlib import Path

    from ..batch import expand_inputs
    from ..ops.prune import PruneOptions, prune, report_doc

    opts = PruneOptions(rank=rank, mode=mode, mode_param=mode_param, budget=budget, min_rank=min_rank,
                        max_rank=max_rank, score=score, dtype=dtype, base=base, calib=calib, prompts=tuple(prompts),
                        config=config, steps=steps, device=device, seed=seed, no_date=no_date, allow_larger=allow_larger,
                        allow_nonfinite=allow_nonfinite)
    items, is_batch = expand_inputs(inputs)
    if not items:
        err(f"{' '.join(inputs)}: no model files found")
        return 2
    if not is_batch:
        res = prune(items[0], output, opts, overwrite=overwrite, report_path=report, plot_path=plot, quiet=quiet)
        if not quiet:
            _summary(res)
        _warn(res)
        if as_json:
            click.echo(json.dumps(report_doc(res, opts), indent=1))
        return 0
    pairs = batch_outputs(items, output)
    if jobs > 1:
        # build the architecture templates (and import diffusers/transformers) once, here: diffusers'
        # lazy imports are not thread-safe, and parallel first uses raise ImportError
        from ..layouts.model_index import ModelIndex
        from ..ops.inspect import ADAPTER_ARCHS

        for arch in ADAPTER_ARCHS:
            ModelIndex.template(arch)
        if score == "sensitivity":
            from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: F401
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: F401

    def work(src, dst):
        rep = str(Path(report).with_name(f"{dst.stem}.json")) if report else None
        png = str(Path(plot).with_name(f"{dst.stem}.png")) if plot else None
        _warn(prune(src, dst, opts, overwrite=overwrite, report_path=rep, plot_path=png, quiet=True))

    return run_batch(pairs, work, overwrite=overwrite, jobs=jobs, debug=debug, quiet=quiet, desc="rank-prune")


def _warn(res):
    """A larger output (with --allow-larger) or little of ΔW's energy kept: said even with -q and in batches."""
    for line in res.warnings:
        click.echo(f"lycotools: warning: {line}", err=True)


def _summary(res):
    ranks = [l.new_rank for l in res.layers]
    kept = [r for r in ranks if r]
    rr = f"ranks {min(kept)}–{max(kept)}" if kept else "no layer kept"
    click.echo(f"lycotools: wrote {res.output}: {len(kept)}/{len(ranks)} layers, {rr}, "
               f"{res.params_before} → {res.params_after} params, {100 * res.energy_kept():.2f}% of ΔW energy kept",
               err=True)
    if res.passthrough:
        click.echo(f"lycotools: {len(res.passthrough)} modules copied unchanged (not prunable: DoRA, IA3, norms, OFT...)",
                   err=True)
    if res.unscored:
        click.echo(f"lycotools: warning: {len(res.unscored)} layers are not in the --base model, so have no "
                   f"sensitivity score and were dropped: {', '.join(res.unscored[:3])}"
                   f"{' ...' if len(res.unscored) > 3 else ''}", err=True)
    if res.bias_dropped:
        click.echo(f"lycotools: warning: {len(res.bias_dropped)} bias changes (diff_b) not stored: a LoRA carries no bias",
                   err=True)
    if res.dropped:
        click.echo(f"lycotools: warning: {len(res.dropped)} modules skipped (no target, or not prunable and not "
                   f"kohya-named): {', '.join(res.dropped[:5])}{' ...' if len(res.dropped) > 5 else ''}", err=True)
