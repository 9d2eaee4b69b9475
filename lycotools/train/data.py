"""Training data: images with same-name caption files, kohya ``N_name`` repeat folders, latent caching.

* A data folder holds images (``.png .jpg .jpeg .webp .bmp``) with captions in same-name ``.txt``
  files (``--caption-ext``); images without a caption use ``--default-caption`` or are an error.
* Sub-folders named ``N_name`` (kohya) repeat their images N times per epoch; images directly in the
  folder, or in sub-folders without the prefix, count once.
* Every image is resized (to cover) and centre-cropped to a square ``resolution`` × ``resolution``,
  or, with aspect-ratio buckets, to its bucket: the ``step``-multiple size of area ≤ resolution² whose
  aspect ratio is closest to the image's; a batch only holds images of one bucket.
* Latents are the VAE posterior mean × scaling factor, computed once before training; with
  ``cache_to_disk`` each image's latents are kept in ``<stem>.lycotools-latents-<res>.safetensors``
  (beside the image, or in ``cache_dir``) and reused while the image's size and mtime do not change.
* Captions can be augmented each time a sample is drawn, as kohya's trainer does (``process_caption``):
  caption dropout, then shuffling and tag dropout of the comma-separated tags after the first
  ``keep_tokens``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import BadInput

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEATS = re.compile(r"^(\d+)_(.*)$")


@dataclass
class ImageItem:
    path: Path
    caption: str
    repeats: int = 1
    subset: str = ""
    size: tuple[int, int] | None = None  # (width, height) trained at; None: square resolution
    caption_args: dict | None = None  # a dataset-config subset's own caption settings (CaptionOptions fields)


@dataclass(frozen=True)
class CaptionOptions:
    """kohya's caption augmentation: ``shuffle_caption``, ``keep_tokens``, ``caption_dropout_rate``,
    ``caption_tag_dropout_rate``."""

    shuffle: bool = False
    keep_tokens: int = 0
    dropout_rate: float = 0.0
    tag_dropout_rate: float = 0.0

    @property
    def active(self) -> bool:
        return self.shuffle or self.dropout_rate > 0 or self.tag_dropout_rate > 0

    def with_args(self, args: dict | None) -> "CaptionOptions":
        return replace(self, **args) if args else self


def check_caption_options(co: CaptionOptions, toml: bool = False) -> None:
    """ValueError naming the option (``--keep-tokens``, or the TOML key ``keep_tokens``) for a bad value."""
    def name(key):
        return key if toml else "--" + key.replace("_", "-")

    if isinstance(co.keep_tokens, bool) or not isinstance(co.keep_tokens, int) or co.keep_tokens < 0:
        raise ValueError(f"{name('keep_tokens')} {co.keep_tokens!r} must be a whole number, 0 or more")
    for key, v in (("caption_dropout_rate", co.dropout_rate), ("caption_tag_dropout_rate", co.tag_dropout_rate)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name(key)} {v} must be between 0 and 1")


def process_caption(caption: str, co: CaptionOptions, g: torch.Generator) -> str:
    """One draw of a sample's caption, in kohya's order: with probability ``dropout_rate`` the whole
    caption becomes ""; otherwise, when shuffling or tag dropout is on, the caption is split at commas
    (tags stripped), the first ``keep_tokens`` tags stay in front in order, the others are shuffled
    (``shuffle``) and each then dropped with probability ``tag_dropout_rate``, and the tags are joined
    with ", ". Random numbers come from ``g`` (CPU generator) and only for the steps that are on.
    """
    if co.dropout_rate > 0 and float(torch.rand((), generator=g)) < co.dropout_rate:
        return ""
    if not (co.shuffle or co.tag_dropout_rate > 0):
        return caption
    tags = [t.strip() for t in caption.strip().split(",")]
    fixed, flex = tags[: co.keep_tokens], tags[co.keep_tokens:]
    if co.shuffle:
        flex = [flex[i] for i in torch.randperm(len(flex), generator=g).tolist()]
    if co.tag_dropout_rate > 0:
        keep = (torch.rand(len(flex), generator=g) >= co.tag_dropout_rate).tolist()
        flex = [t for t, k in zip(flex, keep) if k]
    return ", ".join(fixed + flex)


def bucket_for(width: int, height: int, resolution: int, step: int = 64) -> tuple[int, int]:
    """(w, h), multiples of ``step`` with w·h ≤ resolution², aspect closest to width/height (larger area on ties)."""
    import math

    area = resolution * resolution
    target = math.log(width / height)
    cands = set()
    w = step
    while w * step <= area:
        h = (area // w) // step * step
        if h >= step:
            cands |= {(w, h), (h, w)}  # both orientations, so portrait and landscape buckets mirror
        w += step
    if not cands:
        return resolution, resolution
    return min(cands, key=lambda c: (round(abs(math.log(c[0] / c[1]) - target), 9), -(c[0] * c[1]), c))


def assign_buckets(items: list[ImageItem], resolution: int, step: int) -> None:
    from PIL import Image, UnidentifiedImageError

    for it in items:
        try:
            with Image.open(it.path) as im:
                w, h = im.size
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise BadInput(it.path, f"cannot read the image ({e.__class__.__name__}: {e})") from None
        it.size = bucket_for(w, h, resolution, step)


def _caption_for(img: Path, caption_ext: str, default_caption: str | None) -> str:
    cap = img.with_suffix(caption_ext if caption_ext.startswith(".") else "." + caption_ext)
    if cap.exists():
        text = cap.read_text(encoding="utf-8", errors="replace").strip()
        return " ".join(text.split())
    if default_caption is not None:
        return default_caption
    raise BadInput(img, f"no caption file {cap.name}",
                   hint="add a caption file per image, or pass --default-caption TEXT (or --caption-ext)")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def scan_folder(folder, caption_ext: str = ".txt", default_caption: str | None = None) -> list[ImageItem]:
    """All (image, caption, repeats) of a data folder; BadInput for an empty folder or a missing caption."""
    folder = Path(folder)
    if not folder.exists():
        raise BadInput(folder, "no such folder")
    if not folder.is_dir():
        raise BadInput(folder, "the training data must be a folder of images with captions")
    items = [ImageItem(p, _caption_for(p, caption_ext, default_caption), 1, "") for p in _images_in(folder)]
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        m = _REPEATS.match(sub.name)
        repeats, name = (int(m.group(1)), m.group(2)) if m else (1, sub.name)
        if repeats < 1:
            continue
        # kohya: the folder name after N_ is the class/instance prompt when captions are missing
        default = default_caption if default_caption is not None else (name if m else None)
        items += [ImageItem(p, _caption_for(p, caption_ext, default), repeats, sub.name) for p in _images_in(sub)]
    if not items:
        raise BadInput(folder, f"no images found (looked for {', '.join(IMAGE_EXTS)} here and in N_name sub-folders)")
    return items


def load_image(path: Path, resolution: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1]: resized to cover ``size`` (default: resolution²), centre-cropped."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise BadInput(path, f"cannot read the image ({e.__class__.__name__}: {e})") from None
    tw, th = size or (resolution, resolution)
    w, h = im.size
    s = max(tw / w, th / h)
    nw, nh = max(tw, round(w * s)), max(th, round(h * s))
    im = im.resize((nw, nh), Image.Resampling.BICUBIC if s > 1 else Image.Resampling.LANCZOS)
    left, top = (nw - tw) // 2, (nh - th) // 2
    im = im.crop((left, top, left + tw, top + th))
    t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(th, tw, 3)
    return t.permute(2, 0, 1).float() / 127.5 - 1.0


def _cache_path(img: Path, resolution: int, cache_dir: Path | None, size=None) -> Path:
    tag = f"{size[0]}x{size[1]}" if size else str(resolution)
    name = f"{img.stem}.lycotools-latents-{tag}.safetensors"
    if cache_dir is None:
        return img.with_name(name)
    # keep sub-folder names apart in a shared cache folder
    return cache_dir / f"{img.parent.name}__{name}"


def _stamp(img: Path) -> str:
    st = img.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


@torch.no_grad()
def encode_latents(items: list[ImageItem], vae, resolution: int, *, device="cpu", dtype=torch.float32,
                   cache_to_disk=False, cache_dir=None, batch_size=4, quiet=True) -> list[torch.Tensor]:
    """One latent tensor (4, res/f, res/f) per item, float32 on the CPU, in item order."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    cache_dir = Path(cache_dir) if cache_dir else None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    scale = float(getattr(vae.config, "scaling_factor", 0.18215))
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out: list[torch.Tensor | None] = [None] * len(items)
    todo = []
    for i, it in enumerate(items):
        cp = _cache_path(it.path, resolution, cache_dir, it.size)
        if cache_to_disk and cp.exists():
            try:
                from safetensors import safe_open

                with safe_open(str(cp), "pt") as f:
                    if (f.metadata() or {}).get("stamp") == _stamp(it.path):
                        out[i] = load_file(str(cp))["latents"].float()
                        continue
            except Exception:  # a broken cache file is recomputed
                pass
        todo.append(i)
    vae_dev = vae.to(device=device) if next(vae.parameters()).dtype == dtype else vae.to(device=device, dtype=dtype)
    bar = tqdm(total=len(todo), desc="cache latents", disable=quiet or not todo, leave=False)
    groups: dict = {}
    for i in todo:  # one VAE batch per size
        groups.setdefault(items[i].size, []).append(i)
    chunks = [g[s:s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]
    for idx in chunks:
        imgs = torch.stack([load_image(items[i].path, resolution, items[i].size) for i in idx]).to(device=device, dtype=dtype)
        lat = (vae_dev.encode(imgs).latent_dist.mean - shift) * scale
        for i, l in zip(idx, lat.float().cpu()):
            out[i] = l.contiguous()
            if cache_to_disk:
                save_file({"latents": out[i]}, str(_cache_path(items[i].path, resolution, cache_dir, items[i].size)),
                          metadata={"stamp": _stamp(items[i].path), "resolution": str(resolution)})
        bar.update(len(idx))
    bar.close()
    return out  # type: ignore[return-value]


class LatentDataset(torch.utils.data.Dataset):
    """Items expanded by their repeats: (latents, caption); ``caption_args[i]``: the subset's own caption
    settings of entry i (or None)."""

    def __init__(self, items: list[ImageItem], latents: list[torch.Tensor]):
        self.entries = []
        self.caption_args: list[dict | None] = []
        for it, lat in zip(items, latents):
            self.entries += [(lat, it.caption)] * it.repeats
            self.caption_args += [it.caption_args] * it.repeats

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        return self.entries[i]


def collate(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def collate_any(batch):
    """Like ``collate`` for samples that may come from several buckets: the most common size wins,
    the others are replaced by repeats of it (class images in DreamBooth)."""
    shapes = [tuple(b[0].shape) for b in batch]
    common = max(set(shapes), key=shapes.count)
    same = [b for b in batch if tuple(b[0].shape) == common]
    return collate([same[i % len(same)] for i in range(len(batch))])


# ---------------------------------------------------------------------------------------------- TOML
# kohya's dataset config (docs/formats.md#kohya-dataset-config): [general], [[datasets]], [[datasets.subsets]]. The keys read:
_CAPTION_KEYS = {"shuffle_caption": "shuffle", "keep_tokens": "keep_tokens", "caption_dropout_rate": "dropout_rate",
                 "caption_tag_dropout_rate": "tag_dropout_rate"}  # TOML key -> CaptionOptions field
_GENERAL_KEYS = {"resolution", "batch_size", "enable_bucket", "bucket_reso_steps", "caption_extension", *_CAPTION_KEYS}
_SUBSET_KEYS = {"image_dir", "num_repeats", "class_tokens", "caption_extension", "is_reg", *_CAPTION_KEYS}


def caption_args(path, table: dict) -> dict | None:
    """The caption keys of a dataset-config table as CaptionOptions fields (checked), or None when it sets none."""
    args = {}
    for key, field in _CAPTION_KEYS.items():
        if key in table:
            v = table[key]
            if key == "shuffle_caption":
                ok = isinstance(v, bool)
            elif key == "keep_tokens":
                ok = isinstance(v, int) and not isinstance(v, bool)
            else:
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            if not ok:
                raise BadInput(path, f"{key} = {v!r} in the dataset config has the wrong type")
            args[field] = float(v) if field.endswith("rate") else v
    if not args:
        return None
    try:
        check_caption_options(CaptionOptions(**args), toml=True)
    except ValueError as e:
        raise BadInput(path, f"dataset config: {e}") from None
    return args


def load_dataset_config(path) -> tuple[list[ImageItem], list[ImageItem], dict, list[str]]:
    """(instance items, regularisation items, dataset-level settings, ignored keys) of a kohya TOML file.

    ``image_dir`` is relative to the TOML file's folder; ``class_tokens`` captions images without a
    caption file; ``is_reg = true`` subsets are DreamBooth class images. Settings: resolution,
    batch_size, enable_bucket, bucket_reso_steps, caption_extension, shuffle_caption, keep_tokens,
    caption_dropout_rate, caption_tag_dropout_rate (first dataset wins); a subset's own caption keys
    (the last four) apply to its images only.
    """
    import tomllib

    path = Path(path)
    try:
        cfg = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BadInput(path, f"cannot read the dataset config ({e})") from None
    general = cfg.get("general", {})
    datasets = cfg.get("datasets", [])
    if not datasets:
        raise BadInput(path, "no [[datasets]] in the dataset config")
    ignored = sorted({f"general.{k}" for k in general if k not in _GENERAL_KEYS})
    settings = {k: v for k, v in general.items() if k in _GENERAL_KEYS}
    items: list[ImageItem] = []
    reg: list[ImageItem] = []
    for ds in datasets:
        for k, v in ds.items():
            if k == "subsets":
                continue
            if k in _GENERAL_KEYS:
                settings.setdefault(k, v)
            else:
                ignored.append(f"datasets.{k}")
        subsets = ds.get("subsets", [])
        if not subsets:
            raise BadInput(path, "a [[datasets]] entry has no [[datasets.subsets]]")
        for sub in subsets:
            ignored += [f"subsets.{k}" for k in sub if k not in _SUBSET_KEYS]
            if "image_dir" not in sub:
                raise BadInput(path, "a subset has no image_dir")
            folder = (path.parent / sub["image_dir"]).resolve()
            if not folder.is_dir():
                raise BadInput(folder, "image_dir of the dataset config is not a folder")
            ext = sub.get("caption_extension", ds.get("caption_extension", general.get("caption_extension", ".txt")))
            images = _images_in(folder)
            if not images:
                raise BadInput(folder, "no images in this subset's image_dir")
            repeats = int(sub.get("num_repeats", 1))
            default = sub.get("class_tokens")
            cargs = caption_args(path, sub)
            new = [ImageItem(p, _caption_for(p, ext, default), repeats, folder.name, caption_args=cargs) for p in images]
            (reg if sub.get("is_reg") else items).extend(new)
    if not items:
        raise BadInput(path, "the dataset config has only regularisation (is_reg) subsets")
    return items, reg, settings, sorted(set(ignored))
