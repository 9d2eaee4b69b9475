"""A small on-disk cache for derived layout facts (key maps, architecture templates).

Deriving a key map runs diffusers' converters, and importing diffusers alone takes seconds; the
result depends only on the key/shape set and the library versions, so it is stored as JSON under
``$LYCOTOOLS_CACHE_DIR`` (default ``$XDG_CACHE_HOME/lycotools`` or ``~/.cache/lycotools``) and
reused. ``LYCOTOOLS_NO_CACHE=1`` turns it off. A cache that cannot be read or written is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path

from .. import __version__


def _dir() -> Path | None:
    if os.environ.get("LYCOTOOLS_NO_CACHE"):
        return None
    base = os.environ.get("LYCOTOOLS_CACHE_DIR")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "lycotools"


def _versions() -> str:
    out = [__version__]
    for pkg in ("diffusers", "transformers"):
        try:
            out.append(metadata.version(pkg))
        except metadata.PackageNotFoundError:
            out.append("-")
    return "/".join(out)


def _path(kind: str, key) -> Path | None:
    d = _dir()
    if d is None:
        return None
    h = hashlib.sha256(json.dumps([kind, _versions(), key], sort_keys=True, default=str).encode()).hexdigest()[:32]
    return d / f"{kind}-{h}.json"


def load(kind: str, key):
    p = _path(kind, key)
    if p is None or not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def save(kind: str, key, value) -> None:
    p = _path(kind, key)
    if p is None:
        return
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(value, f)
        os.replace(tmp, p)
    except OSError:
        pass
