"""`lycotools extract`: an adapter from a fine-tuned checkpoint and its base (ΔW = tuned − base, by SVD)."""

from __future__ import annotations

import click

from ..batch import expand_inputs
from ..cli_common import batch_options, batch_outputs, common, run_batch


@click.command("extract")
@click.argument("base")
@click.argument("tuned", nargs=-1, required=True)
@click.option("-o", "--output", required=True, help="Output .safetensors (or a folder in batch mode).")
@click.option("--algo", type=click.Choice(["lora", "locon", "loha", "lokr", "full"]), default="locon", show_default=True)
@click.option("--rank", type=int, default=32, show_default=True, help="Rank of linear and 1x1 layers (--mode fixed).")
@click.option("--conv-rank", type=int, default=None, help="Rank of 3x3 convs (default: --rank).")
@click.option("--mode", type=click.Choice(["fixed", "threshold", "ratio", "quantile", "energy"]), default="fixed", show_default=True,
              help="Per-layer rank rule: fixed rank, singular values above a threshold, above a ratio of the largest, "
                   "a quantile of their sum (LyCORIS), or the energy fraction to keep.")
@click.option("--mode-param", type=float, default=None, help="The rule's parameter (e.g. --mode energy --mode-param 0.9).")
@click.option("--conv-mode-param", type=float, default=None, help="The rule's parameter for 3x3 convs.")
@click.option("--max-rank", type=int, default=None, help="Cap on every layer's rank.")
@click.option("--budget", default=None, help="Whole-file size: parameters (2M), bytes (20MB) or a ratio of the layers' size (0.05).")
@click.option("--parts", default="unet,te", show_default=True, help="Comma list of unet, te (all text encoders), te1, te2.")
@click.option("--tucker/--no-tucker", default=False, show_default=True, help="Tucker (lora_mid) for 3x3 convs.")
@click.option("--full-fallback/--no-full-fallback", default=True, show_default=True,
              help="Store a layer as a full diff when its rank would not save space (diffusers cannot load full diffs).")
@click.option("--include-norms", is_flag=True, help="Also store norm-layer changes (w_norm/b_norm) and full-diff biases.")
@click.option("--min-diff", type=float, default=0.0, show_default=True, help="Layers whose largest |ΔW| is at most this are unchanged.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda for the math.")
@click.option("--dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default="fp16", show_default=True, help="Output dtype.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--loha-steps", type=int, default=200, show_default=True, help="LoHa: most alternating-least-squares sweeps (it stops earlier when a sweep gains under 0.1%).")
@click.option("--lokr-factor", type=int, default=-1, show_default=True, help="LoKr factor (-1: balanced).")
@click.option("--report", "report", default=None, help="Write per-layer rank, kept energy and error as JSON.")
@batch_options()
@common
def extract_cmd(base, tuned, output, algo, rank, conv_rank, mode, mode_param, conv_mode_param, max_rank, budget, parts,
                tucker, full_fallback, include_norms, min_diff, device, dtype, seed, loha_steps, lokr_factor, report, overwrite,
                no_date, jobs, debug, quiet):
    """Extract an adapter from a fine-tuned checkpoint and its base (ΔW = tuned − base, by SVD).

    \b
    Examples:
      lycotools extract base.safetensors tuned.safetensors -o tuned_lora.safetensors --rank 32
      lycotools extract base.safetensors tuned.safetensors -o t.safetensors --mode energy --mode-param 0.95 --max-rank 64
      lycotools extract base.safetensors finetunes/ -o adapters/ --algo loha --rank 8
    """
    from ..batch import require_exists
    from ..ops.extract import ExtractOptions, extract

    require_exists(base)
    opts = ExtractOptions(algo=algo, rank=rank, conv_rank=conv_rank, mode=mode, mode_param=mode_param,
                          conv_mode_param=conv_mode_param, max_rank=max_rank, budget=budget,
                          parts=tuple(p.strip() for p in parts.split(",") if p.strip()), tucker=tucker,
                          include_norms=include_norms, min_diff=min_diff, device=device, dtype=dtype, seed=seed,
                          loha_steps=loha_steps, lokr_factor=lokr_factor, no_date=no_date,
                          full_fallback=full_fallback)
    items, batch = expand_inputs(tuned)
    if not batch:
        res = extract(base, items[0], output, opts, overwrite=overwrite, report_path=report, quiet=quiet)
        if not quiet:
            _extract_summary(res)
        return 0

    def work(src, dst):
        rep = None if not report else str(dst.with_suffix(".report.json"))
        extract(base, src, dst, opts, overwrite=overwrite, report_path=rep, quiet=True)

    return run_batch(batch_outputs(items, output), work, overwrite=overwrite, jobs=jobs, debug=debug, quiet=quiet,
                     desc="extract")


def _extract_summary(res):
    parts = res.part_summary()
    for comp, s in parts.items():
        if s["changed_layers"] == 0:
            click.echo(f"lycotools: {comp}: no difference from the base ({s['unchanged_layers']} layers unchanged); "
                       "nothing extracted for it", err=True)
        else:
            what = []
            if s["rank_min"] is not None:
                lo, hi = s["rank_min"], s["rank_max"]
                what.append(f"rank {lo}" if lo == hi else f"rank {lo}–{hi}")
            for key, label in (("stored_whole", "stored whole"), ("lokr_whole_blocks", "LoKr, both blocks whole"),
                               ("norms", "norm layers"), ("no_budget", "left out: no budget")):
                if s.get(key):
                    what.append(f"{s[key]} {label}")
            detail = f" ({'; '.join(what)})" if what else ""
            click.echo(f"lycotools: {comp}: {s['changed_layers']} layers extracted{detail}, "
                       f"{s['unchanged_layers']} unchanged", err=True)
    errs = [l.rel_error for l in res.layers if l.params]
    worst = max(errs) if errs else 0.0
    click.echo(f"lycotools: wrote {res.output} ({res.params / 1e6:.3f}M params, worst layer relative error {worst:.4f})",
               err=True)
    _poor_layers_warning(res)
    if res.skipped_bias:
        click.echo(f"lycotools: warning: {res.skipped_bias} bias changes not stored "
                   "(low-rank modules carry no bias; use --algo full --include-norms to keep them)", err=True)


def _poor_layers_warning(res):
    """Name the layers whose ΔW the adapter captures badly (relative error above ops.extract.HIGH_ERROR)."""
    from ..ops.extract import HIGH_ERROR

    poor = res.poor_layers()
    if not poor:
        return
    kinds = {"lokr": "LoKr", "loha": "LoHa", "lora": "LoRA", "tucker": "Tucker"}
    shown = ", ".join(f"{l.name} (error {l.rel_error:.2f}, {kinds.get(l.kind, l.kind)}"
                      f"{f' rank {l.rank}' if l.rank else ''})" for l in poor[:5])
    more = f" and {len(poor) - 5} more" if len(poor) > 5 else ""
    if any(l.kind == "lokr" for l in poor):
        hint = ("LoKr is one Kronecker product, which a low-rank ΔW rarely is (a higher --rank stops helping once "
                "w2 is whole): --algo locon fits such layers")
    else:
        hint = "a higher --rank or --budget fits them better"
    click.echo(f"lycotools: warning: {len(poor)} layer(s) of {res.output} keep less than 75% of their ΔW's energy "
               f"(relative error above {HIGH_ERROR}): {shown}{more}; {hint} (--report lists every layer)", err=True)


command = extract_cmd
