"""Test session setup: no hub access, and a fresh layout cache so no test depends on a user's cache."""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["LYCOTOOLS_CACHE_DIR"] = tempfile.mkdtemp(prefix="lycotools-cache-")
