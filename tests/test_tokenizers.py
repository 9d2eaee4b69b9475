"""The CLIP tokenizers shipped with lycotools (``lycotools.layouts.tokenizers``).

Ground truth, offline: ids hard-coded from OpenAI's CLIP tokenizer, and a small pure-python BPE written
here from CLIP's definition (byte -> printable-character table, vocabulary order, greedy lowest-rank
merges, ``</w>`` on a word's last symbol, the pre-tokenizer pattern, lower case) that reads the shipped
file on its own. It leaves out ``ftfy.fix_text`` and ``html.unescape``, which transformers'
``CLIPTokenizer`` does not do either; the generated captions hold no mojibake and no ``&``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import random
import unicodedata
from fnmatch import fnmatch
from functools import lru_cache
from pathlib import Path

import pytest
import regex

from lycotools.layouts import tokenizers as T

ROOT = Path(__file__).resolve().parent.parent
BOS, EOS = 49406, 49407
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"  # open-clip-torch 3.3.0's copy


# ---- a reference CLIP BPE, from the definition --------------------------------------------------

def _byte_table() -> list[str]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + i) for i, b in enumerate(rest)})
    return [chars[b] for b in range(256)]  # indexed by byte value


@lru_cache(maxsize=1)
def _reference():
    lines = gzip.open(T.BPE_FILE, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(x.split()) for x in lines[1:49152 - 256 - 2 + 1]]
    table = _byte_table()
    order = [chr(c) for c in [*range(33, 127), *range(161, 173), *range(174, 256)]]
    order += [table[b] for b in range(256) if table[b] not in order]
    vocab = order + [c + "</w>" for c in order] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab)}, {m: i for i, m in enumerate(merges)}, table


_PAT = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                     regex.IGNORECASE)


def _bpe(word: str, ranks: dict) -> list[str]:
    """Merge the lowest-ranked adjacent pair, every occurrence left to right, until no pair is a merge."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        rank, first, second = min((ranks.get(p, math.inf), *p) for p in zip(parts, parts[1:]))
        if rank == math.inf:
            break
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def reference_ids(text: str, pad: int, length: int = 77) -> list[int]:
    vocab, ranks, table = _reference()
    text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
    ids = []
    for word in _PAT.findall(text):
        mapped = "".join(table[b] for b in word.encode("utf-8"))
        ids.extend(vocab[p] for p in _bpe(mapped, ranks))
    ids = [BOS] + ids[: length - 2] + [EOS]
    return ids + [pad] * (length - len(ids))


# ---- captions -------------------------------------------------------------------------------------

WORDS = ["a", "photo", "of", "cat", "dog", "portrait", "masterpiece", "best quality", "1girl", "solo", "long hair",
         "looking at viewer", "smile", "outdoors", "sky", "cloud", "tree", "highres", "absurdres", "detailed",
         "sunset", "cyberpunk", "city", "neon", "lights", "oil painting", "by greg rutkowski", "trending on artstation",
         "8k", "HDR", "RAW photo", "DSLR", "bokeh", "it's", "don't", "we're", "they've", "I'm", "you'll", "he'd",
         "Café", "naïve", "façade", "Zürich", "São Paulo", "Ελληνικά", "русский", "日本語", "中文字", "한국어",
         "🙂", "🐱‍👤", "❤️", "—", "…", "«quoted»", "C++", "foo_bar", "x-ray", "v1.5", "3.14159", "100%", "#tag",
         "@user", "e-mail", "ＦＵＬＬＷＩＤＴＨ", "ｶﾀｶﾅ", "Ⅻ", "ﬁne", "e\u0301", "wow!", "!!!", "?!", "hello!!", "!"]
SYNTAX = ["(masterpiece:1.2)", "[bad]", "<lora:x:0.5>", "((best quality))", "[[low]]", "(red:0.8)", "{blue}",
          "<hypernet:y:1>", "BREAK", "AND", "[cat:dog:10]", "(a photo:1.1), [bad]", "\\(escaped\\)", "embedding:neg"]


def captions(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["a photo of a cat", "", " ", "A  Photo\tof\na CAT", "(masterpiece:1.2), [bad], <lora:x:0.5>", "wow!",
           "! !! !!!", "hello!", " ".join(["masterpiece"] * 100)]
    while len(out) < n:
        k = rng.choice([1, 3, 8, 20, 60, 120])  # 60 and 120 parts run past 77 tokens
        parts = [rng.choice(WORDS + SYNTAX) for _ in range(k)]
        seps = [rng.choice([", ", " ", ",", " , ", "  ", "\n", "\t", ":", ". "]) for _ in parts]
        text = "".join(p + s for p, s in zip(parts, seps))
        if rng.random() < 0.3:
            text = text.upper()
        out.append(text)
    return out


# ---- tests ----------------------------------------------------------------------------------------

def test_shipped_file_and_notice():
    assert hashlib.sha256(T.BPE_FILE.read_bytes()).hexdigest() == BPE_SHA256
    notice = (T.BPE_FILE.parent / "CLIP_BPE_NOTICE.txt").read_text()
    assert "OpenAI" in notice and "MIT" in notice and "open-clip-torch" in notice
    tomllib = pytest.importorskip("tomllib")
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lycotools"]
    for f in (T.BPE_FILE, T.BPE_FILE.parent / "CLIP_BPE_NOTICE.txt"):
        rel = f.relative_to(ROOT / "lycotools").as_posix()
        assert any(fnmatch(rel, g) for g in globs), f"{rel} is not in [tool.setuptools.package-data]"


def test_vocabulary_layout():
    vocab, merges = T.vocab_and_merges()
    ref_vocab, ref_ranks, _ = _reference()
    assert len(vocab) == T.VOCAB_SIZE == 49408 and len(merges) == 48894
    assert vocab == ref_vocab and list(merges) == sorted(ref_ranks, key=ref_ranks.get)
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    # the 68 non-printable bytes follow the printable ones: byte 0 -> U+0100, space (32) -> U+0120 'Ġ'
    assert T.byte_to_unicode()[0] == "\u0100" and T.byte_to_unicode()[32] == "Ġ" and vocab["Ġ"] == 220
    # OpenAI CLIP's ids for these words
    assert [vocab[w] for w in ("a</w>", "photo</w>", "of</w>", "cat</w>")] == [320, 1125, 539, 2368]


@pytest.mark.parametrize("kind,pad", [("clip-l", EOS), ("openclip", 0)])
def test_known_ids(kind, pad):
    tok = T.clip_tokenizer(kind)
    assert tok.model_max_length == 77 and tok.pad_token_id == pad
    assert tok.bos_token_id == BOS and tok.eos_token_id == EOS
    ids = tok("a photo of a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert ids == [BOS, 320, 1125, 539, 320, 2368, EOS] + [pad] * 70
    # "!" in a prompt is text (OpenCLIP tokenizes it so), also where padding is id 0 ("!")
    assert tok("wow!").input_ids == [BOS, 2781, 256, EOS]
    assert T.vocab_and_merges()[0]["wow</w>"] == 2781


@pytest.mark.parametrize("kind,pad", [("clip-l", EOS), ("openclip", 0)])
def test_matches_reference_bpe(kind, pad):
    tok = T.clip_tokenizer(kind)
    caps = captions()
    got = tok(caps, padding="max_length", max_length=77, truncation=True).input_ids
    long = 0
    for c, g in zip(caps, got):
        assert g == reference_ids(c, pad), repr(c)
        long += g[-1] == EOS and len(tok(c).input_ids) > 77
    assert long >= 20  # truncation was exercised


def test_kinds_per_model():
    assert T.kind_for("sd1", "text_encoder") == "clip-l"
    assert T.kind_for("sd2", "text_encoder") == "openclip"
    assert T.kind_for("sdxl", "text_encoder") == "clip-l" and T.kind_for("sdxl", "text_encoder_2") == "openclip"
    assert T.kind_for("sdxl-refiner", "text_encoder_2") == "openclip"
    assert T.fits(49408) and T.fits(49410) and not T.fits(525) and not T.fits(None)


def test_fresh_objects():
    """Textual inversion adds tokens: each call gives a tokenizer of its own, and pad 0 survives add_tokens."""
    a = T.clip_tokenizer("openclip")
    a.add_tokens(["<my-cat>"])
    assert len(a) == 49409 and len(T.clip_tokenizer("openclip")) == 49408
    assert a("wow! <my-cat>", padding="max_length", max_length=8).input_ids == [BOS, 2781, 256, 49408, EOS, 0, 0, 0]


@pytest.mark.parametrize("kind,pad_token,pad", [("clip-l", "<|endoftext|>", EOS), ("openclip", "!", 0)])
def test_written_folder(tmp_path, kind, pad_token, pad):
    """The files of a diffusers tokenizer folder, as the published SD folders hold them (SD1 / SDXL tokenizer:
    pad <|endoftext|>; SD2 / SDXL tokenizer_2: pad "!", id 0), load in transformers with the same ids."""
    from transformers import CLIPTokenizer

    folder = T.write_tokenizer_folder(tmp_path / "tokenizer", kind)
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "special_tokens_map.json",
                                                          "tokenizer_config.json", "vocab.json"]
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["pad_token"] == pad_token and cfg["model_max_length"] == 77 and cfg["tokenizer_class"] == "CLIPTokenizer"
    assert json.loads((folder / "special_tokens_map.json").read_text())["pad_token"] == pad_token
    assert json.loads((folder / "vocab.json").read_text()) == T.vocab_and_merges()[0]
    merges = (folder / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version") and len(merges) == 1 + 48894
    tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert tok.pad_token_id == pad and tok.model_max_length == 77
    mem = T.clip_tokenizer(kind)
    caps = [c for c in captions(60, seed=1) if "!" not in c]  # a folder's "!" pad is a special token (diffusers#4153)
    assert tok(caps, padding="max_length", max_length=77, truncation=True).input_ids == \
        mem(caps, padding="max_length", max_length=77, truncation=True).input_ids
