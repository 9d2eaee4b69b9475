"""Textual-inversion embedding files: A1111 ``.pt``, kohya ``emb_params``, diffusers ``learned_embeds``, SDXL pairs."""

from __future__ import annotations

from dataclasses import dataclass, field

TOKEN_METADATA = "lycotools.token"  # safetensors metadata key holding the token of a kohya / SDXL embedding

# CLIP widths -> the encoder they belong to
ENCODER_WIDTHS = {768: "CLIP-L (SD1 / SDXL text_encoder)", 1024: "OpenCLIP-H (SD2)", 1280: "OpenCLIP-G (SDXL text_encoder_2)"}


@dataclass
class EmbeddingInfo:
    format: str  # a1111 | kohya | diffusers | sdxl
    token: str | None
    vectors: int
    widths: dict[str, int] = field(default_factory=dict)  # tensor key -> width
    keys: dict[str, str] = field(default_factory=dict)  # role -> file key ("clip_l", "clip_g", "vectors")

    @property
    def target(self) -> str:
        if self.format == "sdxl":
            return "SDXL (clip_l + clip_g)"
        w = next(iter(self.widths.values()), None)
        return ENCODER_WIDTHS.get(w, f"text encoder of width {w}")


def detect_embedding(source) -> EmbeddingInfo | None:
    """Recognise an embedding from a source's keys, shapes and (pickle) extras; None if it is not one."""
    keys = source.keys()
    shapes = source.shapes()
    if not keys or len(keys) > 4:
        return None
    s2p = [k for k in keys if k.startswith("string_to_param.")]
    if s2p:
        if len(s2p) != 1:
            return None
        k = s2p[0]
        name = source.extras.get("name")
        return EmbeddingInfo("a1111", str(name) if name is not None else None, _rows(shapes[k]),
                             {k: shapes[k][-1]}, {"vectors": k})
    # kohya's emb_params and the SDXL pair hold no token in their keys: lycotools writes it to the
    # ``lycotools.token`` metadata (consumers without it name the embedding after the file)
    meta_token = (getattr(source, "metadata", None) or {}).get(TOKEN_METADATA) or None
    if {"clip_l", "clip_g"} <= set(keys):
        l, g = shapes["clip_l"], shapes["clip_g"]
        if len(l) <= 2 and len(g) <= 2 and _rows(l) == _rows(g):
            return EmbeddingInfo("sdxl", meta_token, _rows(l), {"clip_l": l[-1], "clip_g": g[-1]},
                                 {"clip_l": "clip_l", "clip_g": "clip_g"})
        return None
    if len(keys) == 1:
        k = keys[0]
        shp = shapes[k]
        if len(shp) in (1, 2) and "." not in k:
            fmt = "kohya" if k == "emb_params" else "diffusers"
            token = meta_token if k == "emb_params" else k
            return EmbeddingInfo(fmt, token, _rows(shp), {k: shp[-1]}, {"vectors": k})
    return None


def _rows(shape) -> int:
    return 1 if len(shape) == 1 else int(shape[0])
