"""Sample images during ``lycotools train`` (kohya's ``--sample_prompts`` / ``--sample_every_n_steps``).

The prompt file is kohya's text format: one prompt per line, blank lines and lines starting with ``#``
skipped, options after the prompt::

    a photo of <my-cat> on a sofa --n blurry, lowres --w 512 --h 768 --s 28 --l 7 --d 1234

``--n`` negative prompt (default none), ``--w`` / ``--h`` size in px (default: the training resolution;
rounded down to a multiple of 8, as kohya does), ``--s`` inference steps (default ``--sample-steps``),
``--l`` CFG scale (default 7.5, kohya's), ``--d`` seed (default ``--seed`` + the prompt's index, so
reruns give the same images). Other kohya options (``--ss``, ``--cn``, ...) are ignored with a warning.

Sampling uses a diffusers ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` over the modules
being trained (the UNet with its adapter hooks, the text encoders with any TI vectors), a DDIM scheduler
(kohya's default sampler) built from the base's noise schedule and prediction type, and the VAE, which
waits on the CPU between rounds. Prompts are encoded as training encodes captions (``TextConditioner``:
clip skip, SDXL's penultimate layers, a TI token expanded to its vectors), and the latents are decoded
in float32 outside autocast. Each image has its own CPU generator and torch's global RNG state is saved
and restored, so a run with sampling writes the same adapter file as one without.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BadInput

DEFAULT_STEPS = 20
DEFAULT_SCALE = 7.5  # kohya's default --l
MAX_STEPS = 1000  # the training schedule's timesteps: DDIM cannot take more
OPTIONS = {"n": "negative", "w": "width", "h": "height", "s": "steps", "l": "scale", "d": "seed"}


@dataclass(frozen=True)
class SamplePrompt:
    """One line of a prompt file; None: the run's default (resolved by ``resolved``)."""

    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    scale: float | None = None
    seed: int | None = None

    def resolved(self, index: int, *, resolution: int, steps: int, seed: int) -> "SamplePrompt":
        return dataclasses.replace(
            self, width=self.width or resolution, height=self.height or resolution, steps=self.steps or steps,
            scale=DEFAULT_SCALE if self.scale is None else self.scale,
            seed=seed + index if self.seed is None else self.seed)


def parse_line(line: str, where: str = "") -> tuple[SamplePrompt | None, list[str]]:
    """One prompt-file line -> (prompt or None for a blank/comment line, names of ignored options).

    Options start at `` --`` (a space, then two dashes), as kohya splits them; the negative prompt runs
    to the next option."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None, []
    parts = (" " + line).split(" --")
    kw: dict = {}
    ignored: list[str] = []
    for part in parts[1:]:
        m = re.match(r"(\w+)(?:\s+(.*))?$", part.strip(), re.S)
        if not m:
            raise BadInput(None, f"{where}--{part.strip()}: expected an option like --w 512")
        key, value = m.group(1).lower(), (m.group(2) or "").strip()
        if key not in OPTIONS:
            ignored.append(f"--{key}")
            continue
        name = OPTIONS[key]
        if key == "n":
            kw[name] = value
            continue
        try:
            if key == "l":
                v = float(value)
                if not v >= 0:  # also NaN
                    raise ValueError
            else:
                if not re.fullmatch(r"\d+", value):
                    raise ValueError
                v = int(value)
        except ValueError:
            what = "a number of at least 0" if key == "l" else "a whole number of at least 0"
            raise BadInput(None, f"{where}--{key} {value!r}: expected {what}") from None
        if key in ("w", "h"):
            v -= v % 8  # kohya rounds the size down to a multiple of 8
            if v < 8:
                raise BadInput(None, f"{where}--{key} {value}: the size must be at least 8 px")
        if key == "s" and not 1 <= v <= MAX_STEPS:
            raise BadInput(None, f"{where}--s {value}: expected 1 to {MAX_STEPS} steps")
        kw[name] = v
    return SamplePrompt(prompt=parts[0].strip(), **kw), ignored


def load_prompts(path) -> tuple[list[SamplePrompt], list[str]]:
    """The prompts of a kohya text prompt file, and the option names it uses that are ignored."""
    p = Path(path)
    if p.suffix.lower() in (".toml", ".json"):
        raise BadInput(p, "only the text prompt format is supported (one prompt per line, kohya's --n/--w/--h/--s/--l/--d "
                          "options after it)")
    if not p.is_file():
        raise BadInput(p, "no such prompt file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(p, f"cannot read the prompt file ({e.__class__.__name__})") from None
    prompts, ignored = [], []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            sp, ign = parse_line(line, f"line {n}: ")
        except BadInput as e:
            raise BadInput(p, e.message) from None
        if sp is not None:
            prompts.append(sp)
            ignored += [o for o in ign if o not in ignored]
    if not prompts:
        raise BadInput(p, "no prompts in the file (one per line; blank lines and lines starting with # are skipped)")
    return prompts, ignored


def check_options(opts) -> None:
    """The sampling options of ``TrainOptions`` (the prompt file is read by ``load_prompts``)."""
    if opts.sample_every is not None and opts.sample_every < 1:
        raise BadInput(None, f"--sample-every {opts.sample_every} must be at least 1")
    wanted = opts.sample_every is not None or opts.sample_at_first
    if wanted and not opts.sample_prompts:
        flag = "--sample-every" if opts.sample_every is not None else "--sample-at-first"
        raise BadInput(None, f"{flag} needs --sample-prompts FILE (one prompt per line)")
    if opts.sample_prompts and not wanted:
        raise BadInput(None, "--sample-prompts needs --sample-every N (steps) or --sample-at-first")
    if not 1 <= opts.sample_steps <= MAX_STEPS:
        raise BadInput(None, f"--sample-steps {opts.sample_steps}: expected 1 to {MAX_STEPS}")


def sample_dir(output: Path) -> Path:
    stem = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.stem
    return output.with_name(f"{stem}_samples")


def sample_path(output: Path, step: int, index: int) -> Path:
    d = sample_dir(output)
    return d / f"{d.name[: -len('_samples')]}_{step:06d}_{index:02d}.png"


@contextlib.contextmanager
def _quiet_libraries():
    """No diffusers/transformers warnings (e.g. torchvision missing for an image processor) while sampling."""
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl

    old = dl.get_verbosity(), tl.get_verbosity()
    dl.set_verbosity_error()
    tl.set_verbosity_error()
    try:
        yield
    finally:
        dl.set_verbosity(old[0])
        tl.set_verbosity(old[1])


def _unwrap(m):
    return getattr(m, "module", m)


class Sampler:
    """Writes ``<stem>_samples/<stem>_<step>_<i>.png`` for each prompt; call it on the main process only.

    ``base`` is the training ``BaseModel`` (its modules may be wrapped by accelerate: they are unwrapped
    here, so no collective runs), ``vae`` the VAE kept on the CPU, ``ti_tokens`` the TI token and its
    vectors' tokens (``["<tok>", "<tok>_1", ...]``) or None, ``autocast`` the training autocast context."""

    def __init__(self, base, vae, prompts: list[SamplePrompt], output: Path, *, device, resolution: int,
                 steps: int, seed: int, clip_skip: int | None = None, ti_tokens: list[str] | None = None,
                 autocast=contextlib.nullcontext, quiet: bool = False):
        self.base, self.vae, self.output, self.device = base, vae, Path(output), torch.device(device)
        self.prompts = [p.resolved(i, resolution=resolution, steps=steps, seed=seed) for i, p in enumerate(prompts)]
        self.clip_skip, self.ti_tokens, self.autocast, self.quiet = clip_skip, ti_tokens, autocast, quiet

    # ---- pieces
    def _view(self):
        """The base with unwrapped text encoders, for encoding outside the training wrappers."""
        return dataclasses.replace(self.base, text_encoders={c: _unwrap(m) for c, m in self.base.text_encoders.items()},
                                   unet=_unwrap(self.base.unet), vae=self.vae)

    def _expand(self, text: str) -> str:
        """The TI token -> its vectors' tokens, where the prompt names it (never added where it does not)."""
        if not self.ti_tokens:
            return text
        pat = re.compile(rf"(?<![\w]){re.escape(self.ti_tokens[0])}(?![\w])")
        return pat.sub(" ".join(self.ti_tokens), text)

    def _pipeline(self, view):
        from diffusers import DDIMScheduler

        sched = DDIMScheduler(**view.schedule, prediction_type=view.prediction_type, steps_offset=1,
                              set_alpha_to_one=False, timestep_spacing="leading")
        te, tok = view.text_encoders, view.tokenizers
        if view.arch == "sdxl":
            from diffusers import StableDiffusionXLPipeline

            pipe = StableDiffusionXLPipeline(vae=view.vae, text_encoder=te["text_encoder"],
                                             text_encoder_2=te["text_encoder_2"], tokenizer=tok["text_encoder"],
                                             tokenizer_2=tok["text_encoder_2"], unet=view.unet, scheduler=sched,
                                             add_watermarker=False)
        else:
            from diffusers import StableDiffusionPipeline

            pipe = StableDiffusionPipeline(vae=view.vae, text_encoder=te["text_encoder"], tokenizer=tok["text_encoder"],
                                           unet=view.unet, scheduler=sched, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _embeds(self, cond, sp: SamplePrompt) -> dict:
        dev = self.device
        ehs, added = cond([self._expand(sp.prompt)], dev, size=(sp.width, sp.height))
        kw = {"prompt_embeds": ehs}
        if self.base.arch == "sdxl":
            kw["pooled_prompt_embeds"] = added["text_embeds"]
        if sp.scale > 1:  # classifier-free guidance needs the negative side
            if self.base.arch == "sdxl" and not sp.negative:
                # SDXL's force_zeros_for_empty_prompt: an empty negative prompt is zeros
                kw["negative_prompt_embeds"] = torch.zeros_like(ehs)
                kw["negative_pooled_prompt_embeds"] = torch.zeros_like(added["text_embeds"])
            else:
                nehs, nadded = cond([self._expand(sp.negative)], dev, size=(sp.width, sp.height))
                kw["negative_prompt_embeds"] = nehs
                if nadded is not None:
                    kw["negative_pooled_prompt_embeds"] = nadded["text_embeds"]
        return kw

    def _decode(self, latents, vae, pipe):
        cfg = vae.config
        lat = latents.to(self.device, torch.float32)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            mean = torch.tensor(mean, device=lat.device).view(1, -1, 1, 1)
            std = torch.tensor(std, device=lat.device).view(1, -1, 1, 1)
            lat = lat * std / cfg.scaling_factor + mean
        else:
            lat = lat / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
        img = vae.decode(lat).sample
        return pipe.image_processor.postprocess(img.float(), output_type="pil")[0]

    # ---- one round
    @torch.no_grad()
    def __call__(self, step: int) -> list[Path]:
        from .trainer import TextConditioner

        t0 = time.perf_counter()
        view = self._view()
        roots = [view.unet, *view.text_encoders.values(), self.vae]
        modes = [(m, m.training) for r in roots for m in r.modules()]
        out_dir = sample_dir(self.output)
        out_dir.mkdir(parents=True, exist_ok=True)
        fork = [self.device.index if self.device.index is not None else torch.cuda.current_device()] \
            if self.device.type == "cuda" else []
        written = []
        try:
            for r in roots:
                r.eval()
            self.vae.to(self.device)
            with torch.random.fork_rng(devices=fork), _quiet_libraries():
                cond = TextConditioner(view, self.prompts[0].width, self.clip_skip)
                pipe = self._pipeline(view)
                for i, sp in enumerate(self.prompts):
                    g = torch.Generator("cpu").manual_seed(sp.seed)
                    with self.autocast():
                        kw = self._embeds(cond, sp)
                        lat = pipe(height=sp.height, width=sp.width, num_inference_steps=sp.steps,
                                   guidance_scale=sp.scale, generator=g, output_type="latent", **kw).images
                    img = self._decode(lat, self.vae, pipe)
                    path = sample_path(self.output, step, i)
                    img.save(path)
                    written.append(path)
        finally:
            self.vae.to("cpu")
            for m, flag in modes:
                m.training = flag
        if not self.quiet:
            from tqdm import tqdm

            tqdm.write(f"lycotools: step {step}: {len(written)} sample image{'s' if len(written) != 1 else ''} in "
                       f"{out_dir} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        return written
