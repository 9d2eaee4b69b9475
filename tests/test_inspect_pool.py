"""``inspect -j N`` over many files runs in worker processes: the output, the error lines and the
exit status must be those of the one-thread run, byte for byte, good files and broken ones mixed."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lycotools.commands import inspect as inspect_command
from lycotools.errors import BadInput
from lycotools.ops import inspect as insp

FIX = Path(__file__).resolve().parent.parent / "fixtures"


def _run(*args):
    return subprocess.run([sys.executable, "-m", "lycotools", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    files = sorted((FIX / "adapters").glob("*.safetensors")) + sorted((FIX / "embeddings").iterdir()) \
        + sorted((FIX / "bad").iterdir())
    i = 0
    while i < inspect_command._POOL_MIN_FILES + 6:
        for f in files:
            shutil.copy(f, d / f"{i:03d}_{f.name}")
            i += 1
    shutil.copytree(FIX / "adapters" / "sd1_peft", d / "zz_peft")
    return d


@pytest.mark.parametrize("as_json", [True, False])
def test_worker_processes_say_what_one_thread_says(many, as_json):
    flags = ["--json"] if as_json else []
    one = _run("inspect", many, "-j", "1", "-q", *flags)
    pooled = _run("inspect", many, "-j", "2", "-q", *flags)
    assert one.returncode == 2 and "file is empty" in one.stderr
    assert (pooled.stdout, pooled.stderr, pooled.returncode) == (one.stdout, one.stderr, one.returncode)


def test_failures_cross_the_process_boundary_unchanged(tmp_path):
    bad = FIX / "bad" / "truncated.safetensors"
    with pytest.raises(BadInput) as direct:
        insp.inspect_path(bad)
    with pytest.raises(BadInput) as crossed:
        insp.raise_from_worker(insp.inspect_in_worker(bad))
    assert type(crossed.value) is type(direct.value) and crossed.value.line() == direct.value.line()
    fam = insp.UnsupportedFamily(bad, "Flux.1")
    back = insp.raise_from_worker
    with pytest.raises(insp.UnsupportedFamily) as e:
        back((False, ("lyco", type(fam), dict(fam.__dict__))))
    assert e.value.line() == fam.line() and e.value.family == "Flux.1" and e.value.exit_code == 2
    with pytest.raises(ImportError) as e:
        back((False, ("other", "RuntimeError", "x", ("diffusers", "No module named 'diffusers'"))))
    assert e.value.name == "diffusers"
    with pytest.raises(Exception) as e:
        back((False, ("other", "KeyError", "'k'", None)))
    assert e.value.__class__.__name__ == "KeyError" and str(e.value) == "'k'"
