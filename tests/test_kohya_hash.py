"""``sshs_model_hash`` / ``sshs_legacy_hash`` are what kohya writes: bare lowercase hex of the data section.

``tests/data/kohya_made/sd1_lora_kohya.safetensors`` was written by kohya sd-scripts' own hashing and
saving functions (see the README beside it), so its stored hashes are kohya's, not ours.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from lycotools.io.writer import save_tensors

KOHYA_MADE = Path(__file__).parent / "data" / "kohya_made" / "sd1_lora_kohya.safetensors"


def _meta(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_kohya_made_file_stores_bare_hex():
    meta = _meta(KOHYA_MADE)
    assert re.fullmatch(r"[0-9a-f]{64}", meta["sshs_model_hash"])
    assert re.fullmatch(r"[0-9a-f]{8}", meta["sshs_legacy_hash"])
    assert meta["sshs_legacy_hash"] != "e3b0c442"  # the file is big enough for the legacy window to hold bytes


def test_writer_reproduces_kohya_hashes_byte_for_byte(tmp_path):
    theirs = _meta(KOHYA_MADE)
    out = save_tensors(tmp_path / "again.safetensors", load_file(str(KOHYA_MADE)),
                       {k: v for k, v in theirs.items() if not k.startswith("sshs_")})
    ours = _meta(out)
    assert ours["sshs_model_hash"] == theirs["sshs_model_hash"]
    assert ours["sshs_legacy_hash"] == theirs["sshs_legacy_hash"]


def test_convert_round_trip_keeps_kohya_hash(tmp_path):
    """Through the CLI: a kohya -> kohya convert rewrites the same tensors, so kohya's hash comes back."""
    out = tmp_path / "rt.safetensors"
    r = subprocess.run([sys.executable, "-m", "lycotools", "convert", str(KOHYA_MADE), "--to", "kohya", "-o", str(out),
                        "--no-date", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert _meta(out)["sshs_model_hash"] == _meta(KOHYA_MADE)["sshs_model_hash"]
