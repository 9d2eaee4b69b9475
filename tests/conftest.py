"""Test session setup: no hub access, and a fresh layout cache so no test depends on a user's cache."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["LYCOTOOLS_CACHE_DIR"] = tempfile.mkdtemp(prefix="lycotools-cache-")


def load_make_fixtures():
    """fixtures/make_fixtures.py as a module (it is a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "fixtures" / "make_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_fixtures", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def checkpoint_deltas(base, tuned) -> dict:
    """{(component, diffusers key): ΔW} for every weight that differs between two checkpoints (any layout)."""
    from lycotools.layouts.model_view import CheckpointView

    b, t = CheckpointView.open(base), CheckpointView.open(tuned)
    out = {}
    for ck in b.keys():
        d = t.get(*ck).float() - b.get(*ck).float()
        if d.abs().max() > 0:
            out[ck] = d
    return out
