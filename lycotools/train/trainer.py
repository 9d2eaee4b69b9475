"""The training loop of ``lycotools train``: adapters (LoRA/LoCon/LoHa/LoKr/AdaLoRA), full weights (a LyCORIS
``full`` diff file), DreamBooth prior preservation and textual inversion on a local SD1/SD2/SDXL checkpoint.

Device placement, mixed precision, gradient accumulation and multi-GPU data parallelism go through
``accelerate.Accelerator`` (so ``accelerate launch -m lycotools.cli train ...`` works); on one CPU or GPU
it runs as a plain loop. Noise, timesteps and data order come from CPU generators seeded with
``--seed`` (+ the process index), so a CPU run is deterministic and ``--resume`` continues the same
sequence. Caption augmentation (kohya's shuffle / keep-tokens / caption and tag dropout) draws from its
own seeded generator, only when enabled. Sample images (``--sample-prompts``, ``sample.py``) come from the
main process with their own generators and leave the run unchanged.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..devices import ADAPTER_DTYPES as _DTYPES
from .. import validate as v
from ..errors import BadInput
from ..io.metadata import lycotools_record, modelspec, network_metadata
from ..io.writer import check_output, save_tensors
from . import data as data_mod
from . import sample as sample_mod
from .model import load_base
from .modules import inject

ALGOS = ("lora", "locon", "loha", "lokr", "adalora", "full", "ti")
LYCORIS_ALGOS = ("loha", "lokr", "full")
TUCKER_ALGOS = ("locon", "loha", "lokr")


@dataclass
class TrainOptions:
    algo: str = "lora"
    rank: int = 8
    alpha: float | None = None  # None: alpha = rank (scale 1, the conventions' missing-alpha meaning); kohya defaults to 1
    conv_rank: int | None = None
    conv_alpha: float | None = None
    factor: int = -1
    dora: bool = False
    tucker: bool = False
    train_unet: bool = True
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None
    # data
    resolution: int = 512
    enable_bucket: bool = False
    bucket_step: int = 64
    caption_ext: str = ".txt"
    default_caption: str | None = None
    cache_latents_to_disk: bool = False
    cache_dir: str | None = None
    class_data: str | None = None
    class_prompt: str | None = None
    prior_loss_weight: float = 1.0
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    clip_skip: int | None = None
    # schedule
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    v_pred: bool | None = None
    # output
    save_every: int | None = None
    save_state: bool = False
    resume: str | None = None
    save_precision: str = "fp32"
    loss_log: str | None = None
    # sample images (kohya's --sample_prompts / --sample_every_n_steps / --sample_at_first); they do not
    # change the trained file, so they stay out of its recorded options
    sample_every: int | None = None
    sample_at_first: bool = False
    sample_prompts: str | None = None
    sample_steps: int = sample_mod.DEFAULT_STEPS
    no_date: bool = False
    config_dir: str | None = None
    device: str | None = None
    # textual inversion
    token: str | None = None
    init_word: str | None = None
    vectors: int = 1
    # adalora
    init_rank: int = 12
    target_rank: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    orth_reg: float = 0.1
    beta1: float = 0.85
    beta2: float = 0.85

    def __post_init__(self):
        """Every number in range and finite, for the CLI and library callers alike (how options combine
        is checked by ``_check`` when training starts)."""
        for name in ("rank", "batch_size", "vectors", "init_rank", "target_rank", "delta_t", "bucket_step"):
            v.positive_int(f"--{name.replace('_', '-')}", getattr(self, name), optional=False)
        v.positive_int("--gradient-accumulation", self.grad_accum, optional=False)
        for name in ("steps", "epochs", "save_every", "clip_skip"):  # sampling options: sample.check_options
            v.positive_int(f"--{name.replace('_', '-')}", getattr(self, name))
        for name in ("lr_warmup_steps", "tinit", "tfinal"):
            v.positive_int(f"--{name.replace('_', '-')}", getattr(self, name), minimum=0, optional=False)
        v.positive_int("--conv-rank", self.conv_rank, minimum=0)
        v.positive_int("--resolution", self.resolution, minimum=8, optional=False)
        if self.factor != -1:
            v.positive_int("--factor", self.factor, optional=False)
        v.finite("--alpha", self.alpha, 0, lo_open=True)
        v.finite("--conv-alpha", self.conv_alpha, 0, lo_open=True)
        v.finite("--lr", self.lr, 0, lo_open=True, optional=False)
        v.finite("--text-encoder-lr", self.text_encoder_lr, 0)
        for name in ("weight_decay", "max_grad_norm", "noise_offset", "prior_loss_weight", "orth_reg"):
            v.finite(f"--{name.replace('_', '-')}", getattr(self, name), 0, optional=False)
        v.finite("--min-snr-gamma", self.min_snr_gamma, 0, lo_open=True)
        try:  # --keep-tokens and the caption dropout rates: kohya's rules, in the data module
            data_mod.check_caption_options(caption_options(self))
        except ValueError as e:
            raise BadInput(None, str(e)) from None
        for name in ("beta1", "beta2"):
            v.finite(f"--{name}", getattr(self, name), 0, 1, hi_open=True, optional=False)


SAMPLE_FIELDS = ("sample_every", "sample_at_first", "sample_prompts", "sample_steps")  # not in the file's record


@dataclass
class TrainResult:
    output: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    prior_losses: list[float] = field(default_factory=list)
    base: object = None
    network: object = None
    allocator: object = None
    loss_log: Path | None = None
    ranks: dict = field(default_factory=dict)
    step_times: list[float] = field(default_factory=list)  # perf_counter() at the end of each optimizer step
    main_process: bool = True




def _check(opts: TrainOptions):
    if opts.algo not in ALGOS:
        raise BadInput(None, f"--algo {opts.algo}: expected one of {', '.join(ALGOS)}")
    if (opts.steps is None) == (opts.epochs is None):
        raise BadInput(None, "give exactly one of --steps and --epochs")
    if (opts.steps or 1) < 1 or (opts.epochs or 1) < 1 or opts.batch_size < 1 or opts.grad_accum < 1:
        raise BadInput(None, "--steps, --epochs, --batch-size and --gradient-accumulation must be at least 1")
    if opts.resolution % 8 or opts.resolution < 8:
        raise BadInput(None, f"--resolution {opts.resolution} must be a multiple of 8")
    if opts.algo == "ti":
        if not opts.token or not opts.init_word:
            raise BadInput(None, "--algo ti needs --token NAME and --init-word WORD")
        if opts.vectors < 1:
            raise BadInput(None, "--vectors must be at least 1")
    elif opts.algo == "adalora":
        if not 0 < opts.target_rank <= opts.init_rank:
            raise BadInput(None, f"--target-rank ({opts.target_rank}) must be in 1..--init-rank ({opts.init_rank})")
    elif opts.rank < 1 and opts.algo != "full":
        raise BadInput(None, "--rank must be at least 1")
    if opts.tucker:
        if opts.algo not in TUCKER_ALGOS:
            raise BadInput(None, f"--tucker decomposes the 3x3 convs of --algo locon, loha or lokr; "
                                 f"it means nothing for {opts.algo}")
        if opts.conv_rank is not None and opts.conv_rank < 1:
            raise BadInput(None, "--tucker needs adapted 3x3 convs, but --conv-rank is 0")
    if opts.conv_rank is not None and opts.conv_rank < 0:
        raise BadInput(None, f"--conv-rank {opts.conv_rank} must be 0 (no 3x3 convs) or more")
    try:
        data_mod.check_caption_options(caption_options(opts))
    except ValueError as e:
        raise BadInput(None, str(e)) from None
    if opts.clip_skip is not None and opts.clip_skip < 1:
        raise BadInput(None, f"--clip-skip {opts.clip_skip} must be at least 1 (1 = the last layer, 2 = the one before)")
    if opts.dora and opts.algo not in ("lora", "locon", "loha", "lokr"):
        raise BadInput(None, f"--dora works with lora, locon, loha and lokr, not {opts.algo}")
    if not opts.train_unet and not opts.train_text_encoder and opts.algo != "ti":
        raise BadInput(None, "nothing to train: --no-train-unet without --train-text-encoder")
    if opts.mixed_precision not in ("no", "fp16", "bf16"):
        raise BadInput(None, f"--mixed-precision {opts.mixed_precision}: expected no, fp16 or bf16")
    if opts.optimizer.lower() == "adamw8bit":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise BadInput(None, "--optimizer adamw8bit needs bitsandbytes, which is not installed",
                           hint="pip install bitsandbytes, or use --optimizer adamw")
    if opts.save_precision not in _DTYPES:
        raise BadInput(None, f"--save-precision {opts.save_precision}: expected fp32, fp16 or bf16")
    sample_mod.check_options(opts)


_CAPTION_FIELDS = {"shuffle": "shuffle_caption", "keep_tokens": "keep_tokens", "dropout_rate": "caption_dropout_rate",
                   "tag_dropout_rate": "caption_tag_dropout_rate"}  # CaptionOptions field -> TrainOptions field


def caption_options(opts: TrainOptions) -> "data_mod.CaptionOptions":
    return data_mod.CaptionOptions(shuffle=bool(opts.shuffle_caption), keep_tokens=opts.keep_tokens,
                                   dropout_rate=float(opts.caption_dropout_rate),
                                   tag_dropout_rate=float(opts.caption_tag_dropout_rate))


def _make_optimizer(name: str, groups, lr: float, weight_decay: float):
    name = name.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay), "torch.optim.AdamW"
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb  # type: ignore
        except ImportError:
            raise BadInput(None, "--optimizer adamw8bit needs bitsandbytes, which is not installed",
                           hint="pip install bitsandbytes, or use --optimizer adamw") from None
        return bnb.optim.AdamW8bit(groups, lr=lr, weight_decay=weight_decay), "bitsandbytes.optim.AdamW8bit"
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay), "torch.optim.SGD"
    raise BadInput(None, f"--optimizer {name}: expected adamw, adamw8bit or sgd")


# ---------------------------------------------------------------------------------------------- text

class TextConditioner:
    """Captions -> (encoder_hidden_states, added_cond_kwargs or None) for the base's architecture.

    ``clip_skip`` N >= 2 (SD1/SD2, as kohya and A1111): the hidden state N−1 layers before the last,
    through the encoder's final layer norm. SDXL always takes the penultimate layer of both encoders
    without that norm, and kohya ignores clip skip there (so does this class: ``clip_skip`` is None).
    """

    def __init__(self, base, resolution: int, clip_skip: int | None = None):
        self.base, self.res = base, resolution
        if base.arch == "sdxl-refiner":
            raise BadInput(base.path, "training on the SDXL refiner is not supported")
        self.replace: tuple[str, str] | None = None
        self.clip_skip = clip_skip if clip_skip and clip_skip > 1 and base.arch != "sdxl" else None
        if self.clip_skip:
            layers = _unwrap(base.text_encoders["text_encoder"]).config.num_hidden_layers
            if self.clip_skip > layers:
                raise BadInput(None, f"--clip-skip {clip_skip}: the text encoder has only {layers} layers")

    def tokens(self, comp, captions, device):
        tok = self.base.tokenizers[comp]
        return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids.to(device)

    def prepare(self, captions):
        if self.replace is None:
            return list(captions)
        token, expanded = self.replace
        pat = re.compile(rf"(?<![\w]){re.escape(token)}(?![\w])")
        out = []
        for c in captions:
            out.append(pat.sub(expanded, c) if pat.search(c) else f"{expanded}, {c}" if c else expanded)
        return out

    def __call__(self, captions, device, size=None):
        captions = self.prepare(captions)
        b = self.base
        if b.arch == "sdxl":
            te1, te2 = b.text_encoders["text_encoder"], b.text_encoders["text_encoder_2"]
            o1 = te1(self.tokens("text_encoder", captions, device), output_hidden_states=True)
            o2 = te2(self.tokens("text_encoder_2", captions, device), output_hidden_states=True)
            ehs = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
            n = len(captions)
            w, h = size or (self.res, self.res)
            tid = torch.tensor([h, w, 0, 0, h, w], device=device, dtype=ehs.dtype)
            return ehs, {"text_embeds": o2.text_embeds, "time_ids": tid.repeat(n, 1)}
        te = b.text_encoders["text_encoder"]
        ids = self.tokens("text_encoder", captions, device)
        if self.clip_skip:
            h = te(ids, output_hidden_states=True).hidden_states[-self.clip_skip]
            return final_layer_norm(te)(h), None
        out = te(ids)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0], None


def _unwrap(m):
    return getattr(m, "module", m)  # DistributedDataParallel and the like


def final_layer_norm(te):
    """The CLIP text encoder's last LayerNorm (``CLIPTextModel`` has no ``text_model`` level in transformers 5)."""
    m = _unwrap(te)
    return getattr(m, "text_model", m).final_layer_norm


# ---------------------------------------------------------------------------------------------- TI

class TextualInversion:
    """New token rows in each text encoder's embedding; only those rows change."""

    def __init__(self, base, token: str, init_word: str, vectors: int):
        self.base = base
        self.tokens = [token] + [f"{token}_{i}" for i in range(1, vectors)]
        self.rows: dict[str, torch.Tensor] = {}
        self.orig: dict[str, torch.Tensor] = {}
        self.embs: dict[str, torch.nn.Module] = {}
        for comp in base.te_names:
            tok, te = base.tokenizers[comp], base.text_encoders[comp]
            init_ids = tok.encode(init_word, add_special_tokens=False)
            if not init_ids:
                raise BadInput(None, f"--init-word {init_word!r} gives no tokens")
            added = tok.add_tokens(self.tokens)
            if added != len(self.tokens):
                raise BadInput(None, f"--token {token!r} (or {token}_N) is already in the vocabulary",
                               hint="choose a token the tokenizer does not know, e.g. <my-thing>")
            ids = tok.convert_tokens_to_ids(self.tokens)
            te.resize_token_embeddings(len(tok))
            self.embs[comp] = te.get_input_embeddings()
            emb = self.embs[comp].weight
            with torch.no_grad():
                for i, row in enumerate(ids):
                    emb[row] = emb[init_ids[i % len(init_ids)]]
            emb.requires_grad_(True)
            self.rows[comp] = torch.tensor(ids)
            self.orig[comp] = emb.detach().clone()

    def params(self):
        return [self.embs[c].weight for c in self.rows]

    @torch.no_grad()
    def restore(self):
        for comp, rows in self.rows.items():
            emb = self.embs[comp].weight
            keep = torch.ones(emb.shape[0], dtype=torch.bool)
            keep[rows] = False
            keep = keep.to(emb.device)
            emb[keep] = self.orig[comp].to(emb.device, emb.dtype)[keep]

    def vectors(self) -> dict[str, torch.Tensor]:
        out = {}
        for comp, rows in self.rows.items():
            emb = self.embs[comp].weight
            out[comp] = emb.detach()[rows.to(emb.device)].float().cpu().contiguous()
        return out

    def file_tensors(self) -> dict[str, torch.Tensor]:
        v = self.vectors()
        if self.base.arch == "sdxl":
            return {"clip_g": v["text_encoder_2"], "clip_l": v["text_encoder"]}
        return {"emb_params": v["text_encoder"]}

    def state(self):
        return self.vectors()

    @torch.no_grad()
    def load_state(self, st):
        for comp, rows in self.rows.items():
            emb = self.embs[comp].weight
            emb[rows.to(emb.device)] = st[comp].to(emb.device, emb.dtype)


# ---------------------------------------------------------------------------------------------- loop

def place(m: torch.nn.Module, device, dtype) -> None:
    """Move ``m`` to ``device`` with its frozen weights in ``dtype``; parameters that train (``--algo full``
    weights, TI embeddings) keep their own (float32) values, never rounded through ``dtype``."""
    keep = [(p, p.data) for p in m.parameters() if p.requires_grad]
    cur = next(m.parameters()).dtype
    m.to(device=device) if cur == dtype else m.to(device=device, dtype=dtype)
    for p, d in keep:
        if p.dtype != d.dtype:
            p.data = d.to(device)


def _snr(alphas_cumprod, t):
    a = alphas_cumprod.to(t.device)[t]
    return a / (1 - a)


def _metadata(opts, base, output, info) -> dict:
    algo = opts.algo
    arch_key = "sd2-v" if base.arch == "sd2" and base.prediction_type == "v_prediction" else base.arch
    if algo == "ti":
        meta = modelspec(arch_key, "textual-inversion", output.stem, no_date=opts.no_date,
                         prediction="v" if base.prediction_type == "v_prediction" else None)
    else:
        lyco = algo in LYCORIS_ALGOS or opts.dora  # kohya's networks.lora has no DoRA; LyCORIS does
        module = "lycoris.kohya" if lyco else "networks.lora"
        dim = opts.init_rank if algo == "adalora" else opts.rank
        alpha = info["alpha"]
        args = {}
        if lyco:
            args["algo"] = algo
        if algo == "full":  # no rank: dim/alpha 0 as lycotools extract writes full files
            dim = alpha = 0
        elif info["conv_rank"]:
            args["conv_dim"], args["conv_alpha"] = str(info["conv_rank"]), str(info["conv_alpha"])
        if algo == "lokr":
            args["factor"] = str(opts.factor)
        if opts.dora:
            args["dora_wd"] = "True"
        if opts.tucker:
            args["use_tucker"] = "True"
        if algo == "adalora":
            args.update({"adalora": "true", "init_r": str(opts.init_rank), "target_r": str(opts.target_rank)})
        meta = network_metadata(arch_key, module, dim, alpha, args or None)
        meta.update(modelspec(arch_key, "lycoris" if lyco else "lora", output.stem, no_date=opts.no_date,
                              prediction="v" if base.prediction_type == "v_prediction" else None))
        meta["ss_network_dropout"] = "None"
        meta["ss_network_train_unet_only"] = str(not opts.train_text_encoder)
        meta["ss_network_train_text_encoder_only"] = str(not opts.train_unet)
    started = info["started"]
    meta.update({
        "ss_session_id": str(info["session"]),
        "ss_output_name": output.stem,
        "ss_sd_model_name": Path(base.path).name,
        "ss_learning_rate": str(opts.lr),
        "ss_unet_lr": str(opts.lr),
        "ss_text_encoder_lr": str(opts.text_encoder_lr or opts.lr),
        "ss_num_train_images": str(info["num_images"]),
        "ss_num_reg_images": str(info["num_reg"]),
        "ss_num_batches_per_epoch": str(info["batches_per_epoch"]),
        "ss_num_epochs": str(info["epochs"]),
        "ss_epoch": str(info["epoch"]),
        "ss_steps": str(info["step"]),
        "ss_max_train_steps": str(info["total"]),
        "ss_batch_size_per_device": str(opts.batch_size),
        "ss_total_batch_size": str(opts.batch_size * opts.grad_accum * info["world"]),
        "ss_gradient_accumulation_steps": str(opts.grad_accum),
        "ss_gradient_checkpointing": str(opts.gradient_checkpointing),
        "ss_lr_scheduler": opts.lr_scheduler,
        "ss_lr_warmup_steps": str(opts.lr_warmup_steps),
        "ss_optimizer": info["optimizer"],
        "ss_mixed_precision": opts.mixed_precision,
        "ss_full_fp16": "False",
        "ss_seed": str(opts.seed),
        "ss_resolution": f"({opts.resolution}, {opts.resolution})",
        "ss_enable_bucket": str(opts.enable_bucket),
        "ss_bucket_info": json.dumps(info["bucket_info"]) if opts.enable_bucket else "None",
        "ss_cache_latents": "True",
        "ss_caption_extension": opts.caption_ext,
        "ss_shuffle_caption": str(bool(opts.shuffle_caption)),
        "ss_keep_tokens": str(opts.keep_tokens),
        "ss_caption_dropout_rate": str(float(opts.caption_dropout_rate)),
        "ss_caption_tag_dropout_rate": str(float(opts.caption_tag_dropout_rate)),
        "ss_clip_skip": str(info["clip_skip"]),
        "ss_noise_offset": str(opts.noise_offset or None),
        "ss_min_snr_gamma": str(opts.min_snr_gamma),
        "ss_prior_loss_weight": str(opts.prior_loss_weight),
        "ss_max_grad_norm": str(opts.max_grad_norm),
        "ss_v2": str(base.arch == "sd2"),
        "ss_v_parameterization": str(base.prediction_type == "v_prediction"),
        "ss_dataset_dirs": json.dumps(info["dataset_dirs"], sort_keys=True),
        "ss_tag_frequency": json.dumps(info["tag_frequency"], sort_keys=True),
        "ss_training_comment": "None",
    })
    if not opts.no_date:
        meta["ss_training_started_at"] = str(int(started))
        meta["ss_training_finished_at"] = str(int(time.time()))
    opt_record = {k: v for k, v in asdict(opts).items() if k not in ("no_date", *SAMPLE_FIELDS)}
    meta.update(lycotools_record("train", [{"role": "base", "name": Path(base.path).name},
                                           {"role": "data", "name": Path(info["data"]).name}], opt_record))
    return meta


def _dataset_info(items, data_dir):
    dirs: dict[str, dict] = {}
    tags: dict[str, dict[str, int]] = {}
    for it in items:
        key = it.subset or Path(data_dir).name
        d = dirs.setdefault(key, {"n_repeats": it.repeats, "img_count": 0})
        d["img_count"] += 1
        freq = tags.setdefault(key, {})
        for tag in (t.strip() for t in it.caption.split(",")):
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return dirs, tags


def _state_path(output: Path, step: int | None = None) -> Path:
    stem = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name
    tag = f"-step{step:06d}" if step is not None else ""
    return output.with_name(f"{stem}{tag}.state.pt")


def _step_output(output: Path, step: int) -> Path:
    stem = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.stem
    return output.with_name(f"{stem}-step{step:06d}.safetensors")


def train(base_path, data_dir, output, opts: TrainOptions, *, overwrite=False, quiet=False, keep_models=False) -> TrainResult:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm import tqdm

    opts = replace(opts)  # the dataset config may change settings: never the caller's copy
    _check(opts)
    output = Path(output)
    check_output(output, inputs=[base_path], overwrite=overwrite)
    if opts.resume and not Path(opts.resume).is_file():
        raise BadInput(opts.resume, "no such training state file")
    prompts = ignored_prompt_opts = None
    if opts.sample_prompts:
        prompts, ignored_prompt_opts = sample_mod.load_prompts(opts.sample_prompts)
    class_items = []
    if str(data_dir).lower().endswith(".toml"):
        items, class_items, settings, ignored = data_mod.load_dataset_config(data_dir)
        if "resolution" in settings:
            r = settings["resolution"]
            opts.resolution = int(r[0] if isinstance(r, (list, tuple)) else r)
        opts.batch_size = int(settings.get("batch_size", opts.batch_size))
        opts.enable_bucket = bool(settings.get("enable_bucket", opts.enable_bucket))
        opts.bucket_step = int(settings.get("bucket_reso_steps", opts.bucket_step))
        for name, value in (data_mod.caption_args(data_dir, settings) or {}).items():
            setattr(opts, _CAPTION_FIELDS[name], value)
        _check(opts)
        if ignored and not quiet:
            print(f"lycotools: warning: dataset config keys not supported, ignored: {', '.join(ignored)}", file=sys.stderr)
    else:
        items = data_mod.scan_folder(data_dir, opts.caption_ext, opts.default_caption)
    if opts.class_data:
        class_items += data_mod.scan_folder(opts.class_data, opts.caption_ext,
                                           opts.class_prompt if opts.class_prompt is not None else opts.default_caption)
    for it in items + class_items:  # fail on a bad image before any model is built
        data_mod.load_image(it.path, 8)
    if opts.enable_bucket:
        if opts.bucket_step < 8 or opts.bucket_step % 8:
            raise BadInput(None, f"--bucket-step {opts.bucket_step} must be a multiple of 8")
        data_mod.assign_buckets(items + class_items, opts.resolution, opts.bucket_step)

    cpu = opts.device == "cpu" or (opts.device is None and not torch.cuda.is_available())
    acc = Accelerator(mixed_precision=opts.mixed_precision if not cpu else "no",
                      gradient_accumulation_steps=opts.grad_accum, cpu=cpu)
    device = acc.device
    torch.manual_seed(opts.seed)
    base = load_base(base_path, opts.config_dir, v_pred=opts.v_pred)
    if opts.clip_skip and opts.clip_skip > 1 and not quiet and acc.is_main_process:
        if base.arch == "sdxl":
            print("lycotools: warning: --clip-skip has no effect on SDXL (it always conditions on the penultimate "
                  "layers, as kohya does); ignored", file=sys.stderr)
        elif base.arch == "sd2":
            print("lycotools: warning: --clip-skip on SD2 (whose text encoder already ends at OpenCLIP's penultimate "
                  "layer) skips further layers; kohya warns about the same", file=sys.stderr)
    cond = TextConditioner(base, opts.resolution, opts.clip_skip)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)

    # ---- latents (cached once, then the VAE leaves the device)
    vae_dtype = torch.float32
    def encode_all():
        kw = dict(device=device, dtype=vae_dtype, cache_to_disk=opts.cache_latents_to_disk, cache_dir=opts.cache_dir,
                  quiet=quiet or not acc.is_local_main_process)
        lat = data_mod.encode_latents(items, base.vae, opts.resolution, **kw)
        return lat, (data_mod.encode_latents(class_items, base.vae, opts.resolution, **kw) if class_items else [])

    if opts.cache_latents_to_disk and acc.num_processes > 1:
        # the main process writes the disk cache, the others read it afterwards
        if acc.is_local_main_process:
            latents, class_latents = encode_all()
        acc.wait_for_everyone()
        if not acc.is_local_main_process:
            latents, class_latents = encode_all()
    else:
        latents, class_latents = encode_all()
    vae_factor = 2 ** (len(base.vae.config.block_out_channels) - 1)
    base.vae.to("cpu")
    sample_vae = base.vae if prompts and acc.is_main_process else None  # waits on the CPU between sampling rounds
    base.vae = None
    ds = data_mod.LatentDataset(items, latents)
    cds = data_mod.LatentDataset(class_items, class_latents) if class_items else None

    # ---- what trains
    torch.manual_seed(opts.seed)
    net = ti = allocator = None
    info_alpha = conv_rank = conv_alpha = None
    if opts.algo == "ti":
        ti = TextualInversion(base, opts.token, opts.init_word, opts.vectors)
        groups = [{"params": ti.params(), "lr": opts.lr, "weight_decay": 0.0}]
    else:
        rank = opts.init_rank if opts.algo == "adalora" else opts.rank
        alpha = float(opts.alpha) if opts.alpha is not None else float(rank)
        conv_rank = opts.conv_rank if opts.conv_rank is not None else (rank if opts.algo in ("locon", "loha", "lokr") else 0)
        conv_alpha = float(opts.conv_alpha) if opts.conv_alpha is not None else (alpha if conv_rank == rank else float(conv_rank))
        if opts.algo == "adalora":
            conv_rank = 0
        if opts.algo == "full":  # no rank: 3x3 convs train unless --conv-rank 0
            conv_rank = 0 if opts.conv_rank == 0 else 1
        info_alpha = alpha
        net = inject(base, opts.algo, rank=rank, alpha=alpha, conv_rank=conv_rank, conv_alpha=conv_alpha,
                     factor=opts.factor, train_unet=opts.train_unet, train_text_encoder=opts.train_text_encoder,
                     dora=opts.dora, tucker=opts.tucker, te_unused_layers=(cond.clip_skip or 1) - 1)
        if not net.targets:
            raise BadInput(base_path, "no layers to adapt were found in this model")
        unet_p = [p for t in net.targets if t.component == "unet" for p in t.adapter.parameters()]
        te_p = [p for t in net.targets if t.component != "unet" for p in t.adapter.parameters()]
        groups = [g for g in ({"params": unet_p, "lr": opts.lr},
                              {"params": te_p, "lr": opts.text_encoder_lr or opts.lr}) if g["params"]]
    optimizer, opt_name = _make_optimizer(opts.optimizer, groups, opts.lr, opts.weight_decay)

    # ---- steps
    world = acc.num_processes

    def epoch_batches(epoch: int) -> list[list[int]]:
        """This process's micro-batches of one epoch: shuffled, one bucket (latent size) per batch."""
        g = torch.Generator().manual_seed(opts.seed * 7919 + epoch)
        groups: dict = {}
        for i in torch.randperm(len(ds), generator=g).tolist():
            groups.setdefault(tuple(ds[i][0].shape), []).append(i)
        bl = [grp[s:s + opts.batch_size] for grp in groups.values() for s in range(0, len(grp), opts.batch_size)]
        bl = [bl[j] for j in torch.randperm(len(bl), generator=g).tolist()]
        if world > 1:  # every process gets the same number of batches
            per = math.ceil(len(bl) / world)
            bl = (bl * world)[: per * world][acc.process_index::world]
        return bl

    batches_per_epoch = len(epoch_batches(0))
    if opts.steps is not None:
        total = opts.steps
        epochs = math.ceil(total * opts.grad_accum / batches_per_epoch)
    else:
        epochs = opts.epochs
        total = max(1, math.ceil(epochs * batches_per_epoch / opts.grad_accum))
    if opts.algo == "adalora":
        from .adalora import RankAllocator
        try:
            allocator = RankAllocator([t.adapter for t in net.targets], init_rank=opts.init_rank,
                                      target_rank=opts.target_rank, total_steps=total, tinit=opts.tinit,
                                      tfinal=opts.tfinal, delta_t=opts.delta_t, beta1=opts.beta1, beta2=opts.beta2)
        except ValueError as e:
            raise BadInput(None, str(e)) from None
    lr_sched = get_scheduler(opts.lr_scheduler, optimizer, num_warmup_steps=opts.lr_warmup_steps * world,
                             num_training_steps=total * world)

    # ---- placement and precision: frozen weights in the compute dtype, trainable factors in fp32
    te_trains = opts.algo == "ti" or opts.train_text_encoder
    place(base.unet, device, weight_dtype)
    for comp, te in base.text_encoders.items():
        place(te, device, torch.float32 if opts.algo == "ti" else weight_dtype)
    if net is not None:
        net.to(device=device, dtype=torch.float32)
    if opts.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        if te_trains:
            for te in base.text_encoders.values():
                te.gradient_checkpointing_enable()
    base.unet.train(opts.algo != "ti")
    for te in base.text_encoders.values():
        te.train(te_trains)
    prepared = []
    if net is not None and opts.train_unet:
        prepared.append("unet")
    if te_trains:
        prepared += base.te_names
    models = [base.unet if c == "unet" else base.text_encoders[c] for c in prepared]
    out = acc.prepare(*models, optimizer, lr_sched)
    out = list(out) if isinstance(out, (list, tuple)) else [out]
    for c, m in zip(prepared, out[: len(prepared)]):
        if c == "unet":
            unet_call = m
        else:
            base.text_encoders[c] = m
    if "unet" not in prepared:
        unet_call = base.unet
    optimizer, lr_sched = out[len(prepared):]
    if ti is not None:
        cond.replace = (opts.token, " ".join(ti.tokens))

    sched = DDPMScheduler(**base.schedule, prediction_type=base.prediction_type)
    alphas_cumprod = sched.alphas_cumprod
    T = sched.config.num_train_timesteps

    # ---- resume
    step = 0
    g_noise = torch.Generator().manual_seed(opts.seed * 1000 + 2 + acc.process_index)
    g_cap = torch.Generator().manual_seed(opts.seed * 1000 + 500 + acc.process_index)  # caption augmentation only
    if opts.resume:
        st = torch.load(opts.resume, map_location="cpu", weights_only=True)
        if st.get("algo") != opts.algo:
            raise BadInput(opts.resume, f"the state is from --algo {st.get('algo')}, not {opts.algo}")
        if net is not None:
            try:
                net.load_state_dict(st["network"])
            except RuntimeError as e:
                raise BadInput(opts.resume, f"the state does not fit these options ({str(e).splitlines()[0]})") from None
        if ti is not None:
            ti.load_state(st["ti"])
        optimizer.load_state_dict(st["optimizer"])
        lr_sched.load_state_dict(st["lr_scheduler"])
        if allocator is not None and st.get("allocator"):
            allocator.load_state_dict(st["allocator"])
        step = int(st["step"])
        g_noise.set_state(st["g_noise"])
        if "g_cap" in st:
            g_cap.set_state(st["g_cap"])

    log_path = Path(opts.loss_log) if opts.loss_log else output.with_name(
        (output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name) + "_loss.csv")
    info = {"session": uuid.UUID(int=torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(opts.seed)).item()),
            "started": time.time(), "num_images": len(ds), "num_reg": len(cds) if cds else 0,
            "batches_per_epoch": batches_per_epoch, "epochs": epochs, "epoch": 0, "step": step, "total": total,
            "world": world, "optimizer": opt_name, "alpha": info_alpha, "conv_rank": conv_rank, "conv_alpha": conv_alpha,
            "data": str(data_dir), "clip_skip": None if base.arch == "sdxl" else opts.clip_skip}  # SDXL: ignored
    info["dataset_dirs"], info["tag_frequency"] = _dataset_info(items, data_dir)
    buckets: dict = {}
    for it in items:
        key = it.size or (opts.resolution, opts.resolution)
        buckets[key] = buckets.get(key, 0) + it.repeats
    info["bucket_info"] = {"buckets": {str(i): {"resolution": list(k), "count": v}
                                       for i, (k, v) in enumerate(sorted(buckets.items()))}}
    result = TrainResult(output=output, steps=total, loss_log=log_path, main_process=acc.is_main_process)
    sampler = None
    if sample_vae is not None:
        if ignored_prompt_opts and not quiet:
            print(f"lycotools: warning: {opts.sample_prompts}: prompt options not supported, ignored: "
                  f"{', '.join(ignored_prompt_opts)}", file=sys.stderr)
        sampler = sample_mod.Sampler(base, sample_vae, prompts, output, device=device, resolution=opts.resolution,
                                     steps=opts.sample_steps, seed=opts.seed, clip_skip=opts.clip_skip,
                                     ti_tokens=ti.tokens if ti is not None else None, autocast=acc.autocast,
                                     quiet=quiet)

    def sample_images():
        """One sampling round on the main process (the others wait at the barrier)."""
        if sampler is not None:
            sampler(step)
        if prompts and world > 1:
            acc.wait_for_everyone()

    def save(path: Path, final: bool):
        if not acc.is_main_process:
            return
        info["step"] = step
        meta = _metadata(opts, base, path, info)
        if ti is not None:
            tensors = ti.file_tensors()
        else:
            dt = _DTYPES[opts.save_precision]
            tensors = {k: (v if k.endswith(".alpha") else v.to(dt)) for k, v in net.state_tensors().items()}
            result.ranks = {k[: -len(".lora_down.weight")]: int(v.shape[0]) for k, v in tensors.items()
                            if k.endswith(".lora_down.weight")}
        save_tensors(path, tensors, meta, inputs=[base_path], overwrite=True)
        if opts.save_state:
            st = {"algo": opts.algo, "step": step, "optimizer": optimizer.state_dict(),
                  "lr_scheduler": lr_sched.state_dict(), "g_noise": g_noise.get_state(), "g_cap": g_cap.get_state(),
                  "network": net.state_dict() if net is not None else {},
                  "ti": ti.state() if ti is not None else {},
                  "allocator": allocator.state_dict() if allocator is not None else {}}
            torch.save(st, _state_path(output, None if final else step))

    # data order: epoch e uses randperm(seed, e); a resumed run skips the micro-batches already done
    def batches(start_micro: int):
        micro = 0
        epoch = 0
        while True:
            for idx in epoch_batches(epoch):
                if micro >= start_micro:
                    yield epoch, idx
                micro += 1
            epoch += 1

    log_f = None
    writer = None
    if acc.is_main_process:
        new = not (opts.resume and log_path.exists())
        log_f = open(log_path, "w" if new else "a", newline="")
        writer = csv.writer(log_f)
        if new:
            writer.writerow(["step", "epoch", "loss", "prior_loss", "lr", "budget"])
    bar = tqdm(total=total, initial=step, desc=f"train {opts.algo}", unit="step", file=sys.stderr,
               disable=quiet or not acc.is_local_main_process, dynamic_ncols=True)
    gen = batches(step * opts.grad_accum)
    acc_loss, acc_prior, n_micro = 0.0, 0.0, 0
    train_models = [m for m in [unet_call] if "unet" in prepared] + [base.text_encoders[c] for c in base.te_names if c in prepared]
    c_gen = torch.Generator().manual_seed(opts.seed * 1000 + 3)
    run_captions = caption_options(opts)

    def sample(d, i):
        """Entry i of dataset d with its caption augmented (kohya's shuffle / keep-tokens / dropout)."""
        lat, cap = d[i]
        co = run_captions.with_args(d.caption_args[i])
        return lat, (data_mod.process_caption(cap, co, g_cap) if co.active else cap)

    def _sample_losses(lat, caps):
        """Per-sample (min-SNR-weighted) diffusion loss of one batch of latents and captions."""
        lat = lat.to(device=device, dtype=torch.float32)
        noise = torch.randn(lat.shape, generator=g_noise)
        if opts.noise_offset:
            noise = noise + opts.noise_offset * torch.randn(lat.shape[0], lat.shape[1], 1, 1, generator=g_noise)
        t = torch.randint(0, T, (lat.shape[0],), generator=g_noise)
        noise, t = noise.to(device), t.to(device)
        noisy = sched.add_noise(lat, noise, t)
        target = noise if base.prediction_type == "epsilon" else sched.get_velocity(lat, noise, t)
        with acc.autocast():
            with torch.set_grad_enabled(te_trains):
                ehs, added = cond(caps, device, size=(lat.shape[3] * vae_factor, lat.shape[2] * vae_factor))
            pred = unet_call(noisy.to(weight_dtype), t, ehs.to(weight_dtype), added_cond_kwargs=added).sample
        per = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if opts.min_snr_gamma:
            snr = _snr(alphas_cumprod, t)
            per = per * torch.clamp(snr, max=opts.min_snr_gamma) / (snr + (1 if base.prediction_type != "epsilon" else 0))
        return per
    try:
        if opts.sample_at_first:
            sample_images()
        while step < total:
            epoch, idx = next(gen)
            info["epoch"] = epoch + 1
            lat, caps = data_mod.collate([sample(ds, i) for i in idx])
            n_inst = lat.shape[0]
            parts = [(lat, caps)]
            if cds is not None:
                cidx = torch.randint(0, len(cds), (n_inst,), generator=c_gen).tolist()
                clat, ccaps = data_mod.collate_any([sample(cds, i) for i in cidx])
                if clat.shape[1:] == lat.shape[1:]:
                    parts = [(torch.cat([lat, clat]), caps + ccaps)]
                else:  # other buckets: a second forward pass
                    parts.append((clat, ccaps))
            with acc.accumulate(*train_models):
                per = torch.cat([_sample_losses(p_lat, p_caps) for p_lat, p_caps in parts])
                loss = per[:n_inst].mean()
                prior = None
                if cds is not None:
                    prior = per[n_inst:].mean()
                    loss = loss + opts.prior_loss_weight * prior
                total_loss = loss
                if allocator is not None and opts.orth_reg > 0:
                    total_loss = total_loss + opts.orth_reg * allocator.orth_loss()
                if not torch.isfinite(total_loss):
                    raise RuntimeError(f"the loss became {total_loss.item()} at step {step + 1}; "
                                       "lower --lr or use --mixed-precision bf16 instead of fp16")
                acc.backward(total_loss)
                if acc.sync_gradients and opts.max_grad_norm:
                    acc.clip_grad_norm_([p for g in groups for p in g["params"]], opts.max_grad_norm)
                optimizer.step()
                lr_sched.step()
                if acc.sync_gradients:
                    if allocator is not None:
                        allocator.step(step + 1)
                    if ti is not None:
                        ti.restore()
                optimizer.zero_grad(set_to_none=True)
            acc_loss += loss.item() / opts.grad_accum
            if prior is not None:
                acc_prior += prior.item() / opts.grad_accum
            n_micro += 1
            if not acc.sync_gradients:
                continue
            step += 1
            if world > 1:  # log the mean over all processes
                red = acc.reduce(torch.tensor([acc_loss, acc_prior], device=device), "mean").tolist()
                acc_loss, acc_prior = red
            result.step_times.append(time.perf_counter())
            result.losses.append(acc_loss)
            if cds is not None:
                result.prior_losses.append(acc_prior)
            lr_now = lr_sched.get_last_lr()[0]
            if writer is not None:
                writer.writerow([step, epoch + 1, f"{acc_loss:.6g}", f"{acc_prior:.6g}" if cds is not None else "",
                                 f"{lr_now:.6g}", allocator.budget if allocator is not None else ""])
            bar.set_postfix(loss=f"{acc_loss:.4f}", **({"prior": f"{acc_prior:.4f}"} if cds is not None else {}),
                            lr=f"{lr_now:.2e}")
            bar.update(1)
            acc_loss, acc_prior = 0.0, 0.0
            if opts.save_every and step % opts.save_every == 0 and step < total:
                save(_step_output(output, step), final=False)
            if opts.sample_every and step % opts.sample_every == 0:
                sample_images()
        bar.close()
        save(output, final=True)
    finally:
        bar.close()
        if log_f is not None:
            log_f.close()
    acc.wait_for_everyone()
    if keep_models:
        result.base, result.network, result.allocator = base, net, allocator
        result.ti = ti
    return result
