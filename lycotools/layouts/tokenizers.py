"""The CLIP tokenizers of Stable Diffusion 1.x, 2.x and XL, shipped with lycotools (nothing is downloaded).

Every SD text encoder reads the same 49408-token byte-level BPE vocabulary, OpenAI CLIP's
``bpe_simple_vocab_16e6.txt.gz`` (``lycotools/data``, MIT, see ``CLIP_BPE_NOTICE.txt``). From it, as CLIP's
tokenizer defines them:

* vocabulary: the 256 byte symbols (the byte -> printable-character table below), the same 256 with
  ``</w>``, the concatenation of each merge in order, then ``<|startoftext|>`` (49406) and
  ``<|endoftext|>`` (49407);
* merges: lines 1 .. 48894 of the file (line 0 is a version header).

Two kinds differ only in what fills a prompt up to 77 tokens:

* ``clip-l``: OpenAI CLIP ViT-L/14 (SD1.x ``tokenizer``, SDXL ``tokenizer``): ``<|endoftext|>`` (49407);
* ``openclip``: OpenCLIP ViT-H/14 (SD2.x) and ViT-bigG/14 (SDXL ``tokenizer_2``): id 0 (``"!"``), as
  OpenCLIP's tokenizer pads and as kohya sets ``pad_token_id = 0``. In memory a ``"!"`` inside a prompt
  stays ordinary text (``"wow!"`` -> ``wow</w>``, ``!</w>``), as OpenCLIP tokenizes it. The folders diffusers
  publishes (and :func:`write_tokenizer_folder`) say ``"pad_token": "!"``, which transformers turns into a
  special token, so a pipeline loaded from a folder reads a ``"!"`` in a prompt as padding (diffusers#4153);
  the written files match those folders so that a converted model behaves like the published one.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
BPE_FILE = DATA_DIR / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
PAD = {"clip-l": EOS, "openclip": "!"}  # kind -> pad token (openclip: id 0)
KINDS = tuple(PAD)


def byte_to_unicode() -> dict[int, str]:
    """Byte value -> a printable character: the printable Latin-1 bytes map to themselves, the other 68
    bytes, in increasing order, to the characters 256, 257, ... (GPT-2/CLIP byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # insertion order: the kept bytes, then the others (the order of the vocabulary's first 256 ids)


@lru_cache(maxsize=1)
def vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """(token -> id, merges in rank order), read once from the shipped file."""
    if not BPE_FILE.exists():
        raise FileNotFoundError(f"{BPE_FILE} is missing: the lycotools install is incomplete (reinstall it)")
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = tuple(tuple(line.split()) for line in lines[1:1 + N_MERGES])
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{BPE_FILE}: not the CLIP BPE vocabulary ({len(merges)} merges read)")
    symbols = list(byte_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{BPE_FILE}: {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def kind_for(arch: str, comp: str) -> str:
    """The tokenizer kind of a text encoder: OpenCLIP for SD2.x and SDXL's second encoder, else CLIP-L."""
    return "openclip" if comp == "text_encoder_2" or arch == "sd2" else "clip-l"


def fits(vocab_size: int | None) -> bool:
    """Whether a text encoder with this many token embeddings can read the shipped tokenizer's ids."""
    return vocab_size is not None and int(vocab_size) >= VOCAB_SIZE


def clip_tokenizer(kind: str):
    """A new ``transformers.CLIPTokenizer`` of this kind (a fresh object: textual inversion adds tokens to it)."""
    from transformers import CLIPTokenizer

    if kind not in PAD:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")
    vocab, merges = vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), bos_token=BOS, eos_token=EOS, unk_token=EOS,
                        pad_token=EOS, model_max_length=MAX_LENGTH)
    if kind == "openclip":
        # the id only: passing pad_token="!" would make "!" a special token and split it out of prompts
        tok.pad_token_id = 0
    return tok


def tokenizer_files(kind: str) -> dict[str, str]:
    """File name -> text of a diffusers ``tokenizer/`` folder of this kind (as the published SD folders hold)."""
    if kind not in PAD:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {KINDS}")
    vocab, merges = vocab_and_merges()
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD[kind], "unk_token": EOS}
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": MAX_LENGTH,
              "tokenizer_class": "CLIPTokenizer", **special}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "special_tokens_map.json": json.dumps(special, indent=2, sort_keys=True) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2, sort_keys=True) + "\n",
    }


def write_tokenizer_folder(folder, kind: str) -> Path:
    """Write ``vocab.json``, ``merges.txt``, ``special_tokens_map.json`` and ``tokenizer_config.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files(kind).items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


__all__ = ["BPE_FILE", "KINDS", "MAX_LENGTH", "PAD", "VOCAB_SIZE", "byte_to_unicode", "clip_tokenizer", "fits",
           "kind_for", "tokenizer_files", "vocab_and_merges", "write_tokenizer_folder"]
