"""`lycotools train`: fine-tune an adapter (or a textual-inversion embedding) on a folder of images."""

from __future__ import annotations

import click

from ..cli_common import common


@click.command("train")
@click.argument("base")
@click.argument("data")
@click.option("-o", "--output", required=True, help="Output .safetensors (adapter, or embedding for --algo ti).")
@click.option("--algo", type=click.Choice(["lora", "locon", "loha", "lokr", "adalora", "full", "ti"]), default="lora",
              show_default=True,
              help="full: train the targeted layers' own weights and biases; writes a LyCORIS diff/diff_b file.")
@click.option("--rank", type=int, default=8, show_default=True, help="Rank (network dim) of linear and 1x1 layers.")
@click.option("--alpha", type=float, default=None, help="Alpha (scale = alpha / rank); default: the rank (scale 1).")
@click.option("--conv-rank", type=int, default=None,
              help="Rank of 3x3 convs (default: --rank for locon/loha/lokr, 0 for lora; for full, 0 leaves them out).")
@click.option("--conv-alpha", type=float, default=None, help="Alpha of 3x3 convs.")
@click.option("--factor", type=int, default=-1, show_default=True, help="LoKr factor (-1: balanced).")
@click.option("--tucker/--no-tucker", default=False, show_default=True,
              help="LoCon/LoHa/LoKr: Tucker-decomposed 3x3 convs (lora_mid, hada_t1/t2, lokr_t2); "
                   "diffusers cannot load those files.")
@click.option("--dora", is_flag=True, help="DoRA: also train a per-row weight magnitude (dora_scale).")
@click.option("--train-text-encoder", is_flag=True, help="Also adapt the text encoder(s).")
@click.option("--train-unet/--no-train-unet", default=True, show_default=True)
@click.option("--text-encoder-lr", type=float, default=None, help="Learning rate of the text-encoder adapters (default --lr).")
@click.option("--resolution", type=int, default=512, show_default=True, help="Square training size (px).")
@click.option("--enable-bucket", is_flag=True, help="Aspect-ratio buckets (area <= resolution², sides multiples of --bucket-step).")
@click.option("--bucket-step", type=int, default=64, show_default=True, help="Bucket side granularity in px.")
@click.option("--caption-ext", default=".txt", show_default=True)
@click.option("--default-caption", default=None, help="Caption of images without a caption file.")
@click.option("--cache-latents-to-disk", is_flag=True, help="Keep the VAE latents on disk and reuse them.")
@click.option("--cache-dir", default=None, help="Folder for the latent cache (default: beside the images).")
@click.option("--class-data", default=None, help="DreamBooth: folder of class (regularisation) images.")
@click.option("--class-prompt", default=None, help="Caption of class images without a caption file.")
@click.option("--prior-loss-weight", type=float, default=1.0, show_default=True)
@click.option("--shuffle-caption", is_flag=True,
              help="Shuffle the comma-separated tags of each caption every time it is used.")
@click.option("--keep-tokens", type=int, default=0, show_default=True,
              help="The first N tags stay in front, unshuffled and never dropped.")
@click.option("--caption-dropout-rate", type=float, default=0.0, show_default=True,
              help="Probability that a sample trains with an empty caption.")
@click.option("--caption-tag-dropout-rate", type=float, default=0.0, show_default=True,
              help="Probability that each tag (after --keep-tokens) is left out.")
@click.option("--clip-skip", type=int, default=None,
              help="Condition on the text encoder's hidden state N-1 layers before the last, through its final "
                   "layer norm (SD1/SD2, as kohya/A1111; 2 is common for anime models). Ignored on SDXL, as kohya does.")
@click.option("--steps", type=int, default=None, help="Optimizer steps (or give --epochs).")
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=1, show_default=True)
@click.option("--gradient-accumulation", "grad_accum", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--lr-scheduler", default="constant", show_default=True,
              type=click.Choice(["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                                 "polynomial", "piecewise_constant"]))
@click.option("--lr-warmup-steps", type=int, default=0, show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "adamw8bit", "sgd"]), default="adamw", show_default=True,
              help="adamw8bit needs bitsandbytes.")
@click.option("--weight-decay", type=float, default=0.01, show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True, help="0 disables clipping.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--mixed-precision", type=click.Choice(["no", "fp16", "bf16"]), default="no", show_default=True,
              help="Autocast on CUDA (ignored on the CPU).")
@click.option("--gradient-checkpointing", is_flag=True)
@click.option("--noise-offset", type=float, default=0.0, show_default=True)
@click.option("--min-snr-gamma", type=float, default=None, help="Min-SNR-γ loss weighting (e.g. 5).")
@click.option("--v-pred/--eps-pred", "v_pred", default=None,
              help="Force the prediction type (default: the model's scheduler config, else ε).")
@click.option("--save-every", type=int, default=None, help="Also save OUT-stepNNNNNN.safetensors every N steps.")
@click.option("--save-state", is_flag=True, help="Write OUT.state.pt (optimizer, step, factors) for --resume.")
@click.option("--resume", default=None, help="Continue from a .state.pt written by --save-state.")
@click.option("--save-precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--loss-log", default=None, help="CSV loss log (default: OUT_loss.csv).")
@click.option("--sample-every", type=int, default=None,
              help="Write sample images every N steps to OUT_samples/ (needs --sample-prompts).")
@click.option("--sample-at-first", is_flag=True, help="Also sample before the first step.")
@click.option("--sample-prompts", default=None,
              help="kohya prompt file: one prompt per line ('#' comments), options after it: --n negative prompt, "
                   "--w/--h size (default --resolution), --s steps, --l CFG scale (default 7.5), "
                   "--d seed (default --seed + the prompt's index: 0, 1, ...).")
@click.option("--sample-steps", type=int, default=20, show_default=True,
              help="Inference steps of samples without --s (DDIM).")
@click.option("--config", "config_dir", default=None,
              help="Diffusers folder with the configs and tokenizer of a single-file BASE that is not a standard model.")
@click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")
@click.option("--token", default=None, help="TI: the new token, e.g. <my-cat>.")
@click.option("--init-word", default=None, help="TI: word whose embedding starts the new vectors.")
@click.option("--vectors", type=int, default=1, show_default=True, help="TI: vectors per token.")
@click.option("--init-rank", type=int, default=12, show_default=True, help="AdaLoRA: initial rank R.")
@click.option("--target-rank", type=int, default=8, show_default=True, help="AdaLoRA: average final rank r.")
@click.option("--tinit", type=int, default=0, show_default=True, help="AdaLoRA: warm-up steps before pruning.")
@click.option("--tfinal", type=int, default=0, show_default=True, help="AdaLoRA: final steps with the rank pattern fixed.")
@click.option("--delta-t", type=int, default=1, show_default=True, help="AdaLoRA: prune every N steps.")
@click.option("--orth-reg", type=float, default=0.1, show_default=True, help="AdaLoRA: orthogonality regulariser weight.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--no-date", is_flag=True, help="Leave dates out of the metadata (byte-identical reruns).")
@common
def command(base, data, output, debug, quiet, overwrite, **kw):
    """Train an adapter on a folder of images with captions (kohya-style N_name repeat folders).

    DATA is a folder of images with same-name caption files (sub-folders N_name repeat their images N
    times), or a kohya dataset config (.toml: [[datasets]] / [[datasets.subsets]] with image_dir,
    num_repeats, class_tokens, caption_extension, is_reg, and the caption keys shuffle_caption,
    keep_tokens, caption_dropout_rate, caption_tag_dropout_rate; its resolution, batch_size,
    enable_bucket, bucket_reso_steps and caption keys override the options, a subset's caption keys
    apply to that subset). Writes OUT (kohya/LyCORIS adapter with ss_* and modelspec metadata, a
    LyCORIS full diff for --algo full, or an embedding for --algo ti) and OUT_loss.csv, and with
    --sample-prompts, OUT_samples/OUT_<step>_<prompt index>.png (seeded; they do not change OUT).

    \b
    Examples:
      lycotools train sd15.safetensors photos/ -o my_lora.safetensors --rank 16 --steps 1000 --lr 1e-4
      lycotools train sd15/ photos/ -o my_locon.safetensors --algo locon --rank 16 --conv-rank 8 \\
          --epochs 10 --batch-size 4 --mixed-precision bf16 --gradient-checkpointing --min-snr-gamma 5
      lycotools train sd15.safetensors photos/ -o ada.safetensors --algo adalora --init-rank 12 --target-rank 4 \\
          --tinit 100 --tfinal 200 --delta-t 10 --steps 1000
      lycotools train sd15.safetensors dog/ -o dog.safetensors --class-data dogs/ --class-prompt "a dog" \\
          --prior-loss-weight 1 --steps 800
      lycotools train sd15.safetensors tagged/ -o tags.safetensors --algo loha --tucker --shuffle-caption \\
          --keep-tokens 1 --caption-tag-dropout-rate 0.1 --clip-skip 2 --steps 1000
      lycotools train sd15.safetensors photos/ -o tuned_diff.safetensors --algo full --lr 1e-5 --steps 500
      lycotools train sd15.safetensors photos/ -o my_lora.safetensors --steps 1000 \\
          --sample-prompts prompts.txt --sample-every 200 --sample-at-first
      lycotools train sd15.safetensors cat/ -o cat_emb.safetensors --algo ti --token "<my-cat>" \\
          --init-word cat --vectors 2 --lr 5e-3 --steps 2000
      accelerate launch -m lycotools.cli train sdxl.safetensors photos/ -o x.safetensors --mixed-precision bf16 --steps 2000
    """
    from ..train.trainer import TrainOptions, train

    opts = TrainOptions(**kw)
    res = train(base, data, output, opts, overwrite=overwrite, quiet=quiet)
    if not quiet and res.main_process:
        extra = ""
        if res.ranks:
            rs = list(res.ranks.values())
            extra = f", {len(rs)} modules, rank {min(rs)}–{max(rs)}"
        last = f", final loss {res.losses[-1]:.4f}" if res.losses else ""
        click.echo(f"lycotools: wrote {res.output} ({res.steps} steps{last}{extra}); loss log {res.loss_log}", err=True)
    return 0
