"""`lycotools merge`: bake adapters into a checkpoint, merge adapters into one, blend checkpoints."""

from __future__ import annotations


import click

from ..batch import expand_inputs, require_exists
from ..cli_common import batch_options, batch_outputs, common, run_batch
from ..errors import BadInput


@click.command("merge")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Output .safetensors (a folder for a diffusers input or --each).")
@click.option("--into-adapter", is_flag=True, help="Merge the adapters A[:r] B[:r]... into one LoRA.")
@click.option("--models", is_flag=True, help="Merge checkpoints: A B [C...] with --method weighted-sum|add-difference|ties|dare.")
@click.option("--method", default=None,
              help="Adapters: concat (exact, ranks add) or svd (re-factored sum, --rank/--budget). "
                   "Checkpoints: weighted-sum ((1-a)A+aB), add-difference (A+a(B-C)), ties, dare (A + a·merge(B-A, C-A...)).")
@click.option("--rank", type=int, default=None, help="--method svd: rank of linear and 1x1 layers.")
@click.option("--conv-rank", type=int, default=None, help="--method svd: rank of 3x3 convs (default --rank).")
@click.option("--budget", default=None, help="--method svd: whole-file size, parameters (2M), bytes (20MB) or a ratio (0.5).")
@click.option("--densify", is_flag=True, help="--method concat: turn LoHa/LoKr/full/Tucker ΔW into exact LoRA blocks by SVD.")
@click.option("--alpha", type=float, default=None, help="Checkpoint merges: the blend/strength (default 0.5 weighted-sum, else 1).")
@click.option("--density", type=float, default=1.0, show_default=True, help="ties: fraction of each delta kept by magnitude.")
@click.option("--drop-rate", type=float, default=0.9, show_default=True, help="dare: probability each delta entry is dropped.")
@click.option("--block-weights", multiple=True,
              help="Per-block ratios: a LoRA-Block-Weight list (12/20 values SDXL, 17/26 values SD1/SD2) or a preset "
                   "(ALL, NONE, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL). Once for all adapters or once per adapter; "
                   "with --models, per-block alphas.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2"]), default=None,
              help="Output dtype (default: keep the input's; fp16 for --into-adapter).")
@click.option("--allow-nonfinite", is_flag=True,
              help="Write tensors holding NaN or Inf as they are, with a warning (default: refuse the input, exit 2).")
@click.option("--allow-partial", is_flag=True, help="Warn about adapter modules that fit nothing instead of failing.")
@click.option("--each", is_flag=True, help="CHECKPOINT ADAPTER_FOLDER -o OUT_FOLDER: bake each adapter separately.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda for the math.")
@click.option("--seed", type=int, default=0, show_default=True, help="dare's masks (with the key name); svd's randomness.")
@batch_options("Files processed at once with --each.")
@common
def command(inputs, output, into_adapter, models, method, rank, conv_rank, budget, densify, alpha, density, drop_rate,
            block_weights, dtype, allow_nonfinite, allow_partial, each, device, seed, overwrite, no_date, jobs, debug,
            quiet):
    """Bake adapters into a checkpoint, merge adapters into one LoRA, or blend checkpoints (streamed).

    \b
    Examples:
      lycotools merge model.safetensors style.safetensors:0.8 detail.safetensors:0.5 -o baked.safetensors
      lycotools merge model.safetensors lora.safetensors --block-weights MIDD -o baked.safetensors --dtype fp16
      lycotools merge model.safetensors loras/ -o baked/ --each
      lycotools merge --into-adapter a.safetensors:1 b.safetensors:0.5 --method concat -o ab.safetensors
      lycotools merge --into-adapter a.safetensors b.safetensors --method svd --rank 32 -o ab32.safetensors
      lycotools merge --models a.safetensors b.safetensors --method weighted-sum --alpha 0.3 -o ab.safetensors
      lycotools merge --models a.safetensors b.safetensors c.safetensors --method add-difference --alpha 1 -o abc.safetensors
    """
    from ..ops import merge as M

    if into_adapter and models:
        raise BadInput(None, "--into-adapter and --models are different merges; give one")
    if into_adapter:
        specs = [M.parse_spec(t) for t in inputs]
        for p, _ in specs:
            require_exists(p)
        if len(specs) < 1:
            raise BadInput(None, "--into-adapter needs at least one adapter")
        opts = M.AdapterMergeOptions(method=method or "concat", rank=rank, conv_rank=conv_rank, budget=budget,
                                     densify=densify, dtype=dtype or "fp16", device=device, seed=seed,
                                     no_date=no_date, allow_partial=allow_partial, allow_nonfinite=allow_nonfinite)
        res = M.merge_adapters(specs, output, opts, overwrite=overwrite, quiet=quiet)
        if not quiet:
            ranks = sorted(set(res.ranks.values()))
            worst = max(res.errors.values(), default=0.0)
            click.echo(f"{res.output}: {res.modules} modules, rank {ranks[0] if len(ranks) == 1 else f'{ranks[0]}-{ranks[-1]}'}"
                       f", worst relative error {worst:.3g}", err=True)
        return 0
    if models:
        for p in inputs:
            require_exists(p)
        m = method or "weighted-sum"
        a = alpha if alpha is not None else (0.5 if m == "weighted-sum" else 1.0)
        if len(block_weights) > 1:
            raise BadInput(None, "--block-weights: give one list of per-block alphas for a checkpoint merge")
        opts = M.ModelMergeOptions(method=m, alpha=a, block_weights=block_weights[0] if block_weights else None,
                                   density=density, drop_rate=drop_rate, seed=seed, dtype=dtype, device=device,
                                   no_date=no_date, allow_nonfinite=allow_nonfinite)
        out = M.merge_models(list(inputs), output, opts, overwrite=overwrite, quiet=quiet)
        if not quiet:
            _models_summary(out, list(inputs), opts)
        return 0
    # bake
    if method is not None:
        raise BadInput(None, "--method applies to --into-adapter or --models merges")
    if len(inputs) < 2:
        raise BadInput(None, "give a checkpoint and at least one adapter: CHECKPOINT ADAPTER[:RATIO]...")
    checkpoint = inputs[0]
    require_exists(checkpoint)
    opts = M.BakeOptions(dtype=dtype, block_weights=tuple(block_weights), allow_partial=allow_partial,
                         device=device, no_date=no_date, allow_nonfinite=allow_nonfinite)
    if each:
        if len(inputs) != 2:
            raise BadInput(None, "--each takes CHECKPOINT ADAPTER_FOLDER")
        folder, ratio = M.parse_spec(inputs[1])
        require_exists(folder)
        items, _ = expand_inputs([folder])
        if not items:
            raise BadInput(folder, "no adapter files found")

        def work(src, dst):
            _report(M.bake(checkpoint, [(str(src), ratio)], dst, opts, overwrite=overwrite, quiet=True), True)

        return run_batch(batch_outputs(items, output), work, overwrite=overwrite, jobs=jobs, debug=debug,
                         quiet=quiet, desc="merge")
    specs = [M.parse_spec(t) for t in inputs[1:]]
    for p, _ in specs:
        require_exists(p)
    res = M.bake(checkpoint, specs, output, opts, overwrite=overwrite, quiet=quiet)
    _report(res, quiet)
    return 0


def _models_summary(output, inputs, opts):
    """The closing line of a checkpoint merge, as bake and --into-adapter print theirs."""
    from ..io.readers import open_source
    from ..layouts import checkpoint as ckpt
    from ..ops.inspect import short_dtype

    with open_source(output) as src:
        arch = ckpt.detect_source(src).arch
        n = len(src.keys())
        dtypes = {short_dtype(src.dtype(k)) for k in src.keys() if src.dtype(k).is_floating_point}
    how = f"alpha {opts.alpha:g}" + (f", block weights {opts.block_weights}" if opts.block_weights else "")
    if opts.method == "ties":
        how += f", density {opts.density:g}"
    elif opts.method == "dare":
        how += f", drop rate {opts.drop_rate:g}, seed {opts.seed}"
    click.echo(f"{output}: {opts.method} merge of {len(inputs)} {arch} checkpoints ({how}), {n} tensors, "
               f"{'/'.join(sorted(dtypes)) or '-'}", err=True)


def _report(res, quiet):
    if res.skipped:
        first = ", ".join(n for _, n, _ in res.skipped[:3])
        click.echo(f"lycotools: warning: skipped {len(res.skipped)} adapter modules that fit nothing "
                   f"(first: {first})", err=True)
    if not quiet:
        click.echo(f"{res.output}: {res.modules} adapter modules merged into {res.weights_changed} tensors ({res.arch})",
                   err=True)
