"""Outputs never touch inputs, and nothing half-written is ever left: folder outputs that hold an
input, outputs that are an input (symlinks, hard links), signals at any moment, a full disk, symlink
loops in batch folders, batch inputs that share a name, and the umask read without changing it."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from lycotools.cli import main
from lycotools.errors import BadInput

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"
AD = FIX / "adapters"
KOHYA = AD / "sd1_kohya_lora.safetensors"
DIFFUSERS_LORA = AD / "sd1_diffusers_lora.safetensors"
TMP = ".lycotools-tmp"


def cli(*args, code=None):
    res = CliRunner().invoke(main, [str(a) for a in args])
    if code is not None:
        assert res.exit_code == code, (res.exit_code, res.output)
    return res


def leftovers(root: Path) -> list[str]:
    """Temp files and folders anywhere under ``root`` (hidden ones included)."""
    found = []
    for d, dirs, files in os.walk(root):
        found += [os.path.join(d, n) for n in dirs + files if TMP in n]
    return found


def errors(res) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("lycotools: error:")]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# folder outputs never replace a folder holding an input; file outputs are never an input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["w", "parent", "symlink"])
def test_peft_output_never_replaces_the_inputs_folder(tmp_path, target):
    w = tmp_path / "w"
    w.mkdir()
    shutil.copy(KOHYA, w / "lora.safetensors")
    (w / "notes.txt").write_text("keep me")
    (tmp_path / "link").symlink_to(w)
    out = {"w": w, "parent": tmp_path, "symlink": tmp_path / "link"}[target]
    before = snapshot(tmp_path)
    res = cli("convert", w / "lora.safetensors", "--to", "peft", "-o", out, "--overwrite", "-q", code=2)
    assert len(errors(res)) == 1 and f"error: {out}:" in res.stderr
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)


def test_peft_output_inside_an_input_folder_is_refused(tmp_path):
    peft = tmp_path / "peft"
    shutil.copytree(AD / "sd1_peft", peft)
    before = snapshot(peft)
    res = cli("convert", peft, "--to", "peft", "-o", peft / "again", "-q", code=2)
    assert "inside the input folder" in res.stderr
    assert snapshot(peft) == before


def test_checkpoint_to_diffusers_never_replaces_the_inputs_folder(tmp_path):
    w = tmp_path / "w"
    shutil.copytree(FIX / "sd1" / "diffusers", w / "cfg")
    shutil.copy(FIX / "sd1" / "base.safetensors", w / "base.safetensors")
    before = snapshot(w)
    # the checkpoint is in the output folder
    res = cli("convert", w / "base.safetensors", "--to", "diffusers", "-o", w, "--overwrite", "-q", code=2)
    assert "holds the input" in res.stderr
    # the --config folder is in the output folder
    res = cli("convert", FIX / "sd1" / "base.safetensors", "--to", "diffusers", "--config", w / "cfg", "-o", w,
              "--overwrite", "-q", code=2)
    assert "holds the input" in res.stderr and str(w / "cfg") in res.stderr
    assert snapshot(w) == before and not leftovers(tmp_path)


def test_merge_into_a_diffusers_folder_that_holds_an_input(tmp_path):
    d = tmp_path / "model"
    shutil.copytree(FIX / "sd1" / "diffusers", d)
    shutil.copy(KOHYA, d / "lora.safetensors")
    before = snapshot(d)
    for out in (d, d / "merged", tmp_path):  # the checkpoint itself, inside it, a folder holding it
        res = cli("merge", d, d / "lora.safetensors", "-o", out, "--overwrite", "-q", code=2)
        assert len(errors(res)) == 1, res.stderr
    assert snapshot(d) == before and not leftovers(tmp_path)
    res = cli("merge", d, d / "lora.safetensors", "-o", tmp_path / "merged", "-q", code=0)  # elsewhere: fine
    assert (tmp_path / "merged" / "unet").is_dir() and snapshot(d) == before


@pytest.mark.parametrize("link", ["hard", "symlink"])
def test_file_output_that_is_an_input_under_another_name(tmp_path, link):
    src = tmp_path / "lora.safetensors"
    shutil.copy(KOHYA, src)
    other = tmp_path / "other.safetensors"
    os.link(src, other) if link == "hard" else other.symlink_to(src)
    before = src.read_bytes()
    res = cli("convert", src, "--to", "diffusers", "-o", other, "--overwrite", "-q", code=2)
    assert "overwrite an input" in res.stderr
    assert src.read_bytes() == before and not leftovers(tmp_path)


def test_batch_into_the_inputs_folder(tmp_path):
    """``-o`` may be the inputs' folder, but no output may be, hold or replace an input."""
    src = tmp_path / "in"
    (src / "x").mkdir(parents=True)
    shutil.copy(KOHYA, src / "x.safetensors")
    shutil.copy(KOHYA, src / "x" / "y.safetensors")
    before = snapshot(src)
    # --to peft: x.safetensors -> in/x, a folder holding the input in/x/y.safetensors: refused;
    # y.safetensors -> in/y is fine
    res = cli("convert", src, "--to", "peft", "-o", src, "--overwrite", "-q", code=2)
    assert "holds the input" in res.stderr and "1 done, 0 skipped, 1 failed" in res.stderr
    assert (src / "y" / "unet").is_dir()
    assert {k: v for k, v in snapshot(src).items() if k.parts[0] != "y"} == before
    # --to kohya from kohya files: each output would be its own input
    two = tmp_path / "two"
    two.mkdir()
    for n in ("a", "b"):
        shutil.copy(KOHYA, two / f"{n}.safetensors")
    before = snapshot(two)
    res = cli("convert", two, "--to", "kohya", "-o", two, "--overwrite", "-q", code=2)
    assert "overwrite an input" in res.stderr and "0 done, 0 skipped, 2 failed" in res.stderr
    assert snapshot(two) == before and not leftovers(tmp_path)


def test_batch_output_named_like_another_input(tmp_path):
    """A PEFT folder ``w/`` beside ``w.safetensors``: the folder's output ``w.safetensors`` would be the
    other input."""
    src = tmp_path / "in"
    src.mkdir()
    shutil.copytree(AD / "sd1_peft", src / "w")
    shutil.copy(KOHYA, src / "w.safetensors")
    before = snapshot(src)
    res = cli("convert", src, "--to", "kohya", "-o", src, "--overwrite", "-q", code=2)
    assert "overwrite an input" in res.stderr and "1 done" in res.stderr
    assert (src / "w_safetensors.safetensors").exists()
    assert {k: v for k, v in snapshot(src).items() if k.name != "w_safetensors.safetensors"} == before


# ------------------------------------------------------------------------------------------------
# signals: SIGINT, SIGTERM, SIGHUP at any moment leave no temp file, and say what was written
# ------------------------------------------------------------------------------------------------

# Runs the CLI with a hook that, at one moment, touches READY and sleeps: the test sends its signal
# then, so each window is hit every time. Points: "temp" (a temp file or folder was just created),
# "write" (the third tensor is being added), "publish" (the output is being renamed into place).
DRIVER = r"""
import os, sys, tempfile, time
from pathlib import Path

ready, point, args = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
output = os.path.abspath(args[args.index("-o") + 1])


def hook():
    ready.touch()
    time.sleep(1.5)


if point == "temp":
    def after(f):
        def g(*a, **k):
            r = f(*a, **k)
            if str(k.get("suffix", "")).endswith(".lycotools-tmp") and not ready.exists():
                hook()
            return r
        return g
    tempfile.mkstemp, tempfile.mkdtemp = after(tempfile.mkstemp), after(tempfile.mkdtemp)
elif point == "write":
    from lycotools.io import writer
    real, calls = writer._tensor_bytes, []

    def tensor_bytes(t):
        calls.append(1)
        if len(calls) == 3:
            hook()
        return real(t)
    writer._tensor_bytes = tensor_bytes
elif point == "publish":
    real_replace = os.replace

    def replace(a, b, **k):
        if os.path.abspath(b) == output:
            hook()
        return real_replace(a, b, **k)
    os.replace = replace

from lycotools.cli import main
from lycotools.errors import BadInput
sys.argv = ["lycotools", *args]
main()
"""

SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


def _interrupt(tmp_path, args, point, sig, delay=0.0, ignored=()):
    """Run the driver, send ``sig`` at ``point``; return (status, stderr). The child starts with the
    default action for each signal (pytest may run with SIGINT ignored), or ignoring ``ignored``."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    ready = tmp_path / "ready"

    def dispositions():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN if s in ignored else signal.SIG_DFL)

    proc = subprocess.Popen([sys.executable, str(driver), str(ready), point, *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=dispositions)
    if point == "early":
        time.sleep(delay)
    else:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err


@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
@pytest.mark.parametrize("to, point", [("peft", "early"), ("peft", "temp"), ("peft", "write"), ("peft", "publish"),
                                       ("diffusers", "temp"), ("diffusers", "write"), ("diffusers", "publish")])
def test_a_signal_at_any_moment_leaves_no_temp_file(tmp_path, sig, to, point):
    out = tmp_path / ("out" if to == "peft" else "out.safetensors")
    rc, err = _interrupt(tmp_path, ["convert", KOHYA, "--to", to, "-o", out], point, sig, delay=0.5)
    assert not leftovers(tmp_path), err
    if point == "early":  # before lycotools' handlers: the default action, and nothing written...
        if out.exists():  # ...unless a library imported then swallowed the KeyboardInterrupt and the run went on
            assert rc == 0 and load_file(str(out if to != "peft" else out / "unet" / "adapter_model.safetensors")), err
        return
    assert rc == 128 + sig, err
    if point == "publish":  # held off until the rename is done: the output is complete, and said so
        assert "kept" in err and "no output was written" not in err
        assert load_file(str(out if to != "peft" else out / "unet" / "adapter_model.safetensors"))
    else:
        assert "interrupted; no output was written" in err and not out.exists()


def test_an_ignored_signal_stays_ignored(tmp_path):
    """``nohup lycotools ...`` (SIGHUP ignored) must survive the hangup it was started to survive."""
    out = tmp_path / "out.safetensors"
    rc, err = _interrupt(tmp_path, ["convert", KOHYA, "--to", "diffusers", "-o", out], "write", signal.SIGHUP,
                         ignored=(signal.SIGHUP,))
    assert rc == 0 and load_file(str(out)) and not leftovers(tmp_path), err


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_a_signal_during_a_parallel_batch(tmp_path, sig):
    """-j 2: the workers stop at their next write, queued items never start, and the message says
    whether any output was finished first."""
    src = tmp_path / "in"
    src.mkdir()
    for n in "abcd":
        shutil.copy(KOHYA, src / f"{n}.safetensors")
    out = tmp_path / "out"
    rc, err = _interrupt(tmp_path, ["convert", src, "--to", "diffusers", "-j", "2", "-o", out], "write", sig)
    assert rc == 128 + sig and not leftovers(tmp_path), err
    written = sorted(p.name for p in out.iterdir())
    assert len(written) < 4
    assert ("no output was written" in err) == (not written), err


# ------------------------------------------------------------------------------------------------
# a full disk: exit 1 naming the output, temp file removed
# ------------------------------------------------------------------------------------------------


class _FullFile:
    """A file object whose writes fail as on a full disk."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.mark.parametrize("sink", ["buffered", "direct"])
@pytest.mark.parametrize("to", ["diffusers", "peft"])
def test_full_disk_is_exit_1_naming_the_output(tmp_path, monkeypatch, sink, to):
    from lycotools.io import writer

    calls = []
    if sink == "direct":
        if not hasattr(os, "O_DIRECT"):
            pytest.skip("no O_DIRECT on this platform")
        monkeypatch.setattr(writer, "_DIRECT_MIN", 0)
        monkeypatch.setenv("LYCOTOOLS_DIRECT_IO", "1")

        def pwrite(fd, data, offset):
            calls.append(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(os, "pwrite", pwrite)
    else:
        monkeypatch.setenv("LYCOTOOLS_DIRECT_IO", "0")
        real = os.fdopen

        def fdopen(fd, mode="r", *a, **k):
            calls.append(fd)
            f = real(fd, mode, *a, **k)
            return _FullFile(f) if "w" in mode else f
        monkeypatch.setattr(os, "fdopen", fdopen)
    out = tmp_path / ("out" if to == "peft" else "out.safetensors")
    res = cli("convert", KOHYA, "--to", to, "-o", out, "-q", code=1)
    assert calls  # the failing sink was the one used
    assert errors(res) == [l for l in errors(res) if l.startswith(f"lycotools: error: {out}: ")] and len(errors(res)) == 1
    assert "no space left on device" in res.stderr
    assert not out.exists() and not leftovers(tmp_path)


def test_full_disk_spooled_writer(tmp_path, monkeypatch):
    """rank-prune writes through the spool (tensors in any order), then a second temp file."""
    monkeypatch.setenv("LYCOTOOLS_DIRECT_IO", "0")
    real = os.fdopen
    opened = []

    def fdopen(fd, mode="r", *a, **k):
        f = real(fd, mode, *a, **k)
        opened.append(mode)
        return _FullFile(f) if mode == "wb" else f  # the spool works; writing the final file fails
    monkeypatch.setattr(os, "fdopen", fdopen)
    out = tmp_path / "out.safetensors"
    res = cli("rank-prune", KOHYA, "--rank", "2", "-o", out, "-q", code=1)
    assert "wb" in opened and len(errors(res)) == 1 and f"error: {out}: cannot write" in res.stderr
    assert not out.exists() and not leftovers(tmp_path)


# ------------------------------------------------------------------------------------------------
# batch folders: symlink loops, links to parents, two names for one file
# ------------------------------------------------------------------------------------------------


def _looped_tree(tmp_path) -> Path:
    src = tmp_path / "in"
    (src / "a").mkdir(parents=True)
    shutil.copy(KOHYA, src / "a" / "x.safetensors")
    shutil.copy(DIFFUSERS_LORA, src / "y.safetensors")
    (src / "a" / "b").symlink_to(src / "a")  # a loop
    (src / "a" / "c").symlink_to("..")  # back to the root
    (src / "a" / "up").symlink_to(tmp_path)  # a folder holding the root
    (src / "a" / "also_y.safetensors").symlink_to(src / "y.safetensors")  # one file, two names
    os.link(src / "a" / "x.safetensors", src / "hard_x.safetensors")
    shutil.copy(KOHYA, tmp_path / "outside.safetensors")  # beside the root: never an input
    return src


@pytest.fixture
def alarm():
    """Fail instead of hanging."""

    def fire(*_):
        raise TimeoutError("hung")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_walk_and_glob_visit_each_real_file_once(tmp_path, alarm, monkeypatch):
    from lycotools.batch import expand_inputs

    src = _looped_tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    want = [Path("in/a/x.safetensors"), Path("in/y.safetensors")]
    for pattern in ["in", "in/**/*.safetensors", "in/**", "**/*.safetensors", "in/*/*.safetensors"]:
        got, batch = expand_inputs([pattern])
        if pattern == "**/*.safetensors":
            want_here = [Path("outside.safetensors"), *want]
        elif pattern == "in/*/*.safetensors":
            want_here = [Path("in/a/also_y.safetensors"), want[0]]  # y's only name there
        else:
            want_here = want
        assert batch and sorted(got) == sorted(want_here), pattern
    got, _ = expand_inputs([src / "y.safetensors", src / "a" / "also_y.safetensors", src / "y.safetensors"])
    assert got == [src / "y.safetensors"]


def test_batch_over_a_looped_folder_runs_each_file_once(tmp_path, alarm):
    src = _looped_tree(tmp_path)
    out = tmp_path / "out"
    res = cli("convert", src, "--to", "kohya", "-o", out, "-q", code=0)
    assert "2 done, 0 skipped, 0 failed" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["x.safetensors", "y.safetensors"]


# ------------------------------------------------------------------------------------------------
# batch inputs sharing a name: one output each
# ------------------------------------------------------------------------------------------------


def _same_stem(tmp_path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    torch.save(load_file(str(DIFFUSERS_LORA)), src / "pytorch_lora_weights.bin")
    shutil.copy(DIFFUSERS_LORA, src / "pytorch_lora_weights.safetensors")
    return src


@pytest.mark.parametrize("command", [["convert", "--to", "kohya"], ["rank-prune", "--rank", "2"]])
def test_batch_inputs_sharing_a_stem(tmp_path, command):
    src = _same_stem(tmp_path)
    out = tmp_path / "out"
    names = {"pytorch_lora_weights_bin.safetensors": "pytorch_lora_weights.bin",
             "pytorch_lora_weights_safetensors.safetensors": "pytorch_lora_weights.safetensors"}
    res = cli(command[0], src, *command[1:], "-o", out, "-q", code=0)
    assert "2 done, 0 skipped, 0 failed" in res.stderr, res.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for n, source in names.items():  # each output is its own input's, not the other's written over it
        meta = safe_open(str(out / n), "pt").metadata()
        assert json.loads(meta["lycotools.inputs"])[0]["name"] == source
    res = cli(command[0], src, *command[1:], "-o", out, "-q", code=0)
    assert "0 done, 2 skipped, 0 failed" in res.stderr
    res = cli(command[0], src, *command[1:], "-o", out, "--overwrite", "-q", code=0)
    assert "2 done, 0 skipped, 0 failed" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(names)


def test_batch_folder_outputs_sharing_a_stem_with_reports(tmp_path):
    """--to peft writes folders: their names and the reports beside them stay apart too."""
    src = _same_stem(tmp_path)
    out = tmp_path / "out"
    res = cli("convert", src, "--to", "peft", "--report", tmp_path / "r.json", "-o", out, "-q", code=0)
    assert "2 done, 0 skipped, 0 failed" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "pytorch_lora_weights_bin", "pytorch_lora_weights_bin.report.json",
        "pytorch_lora_weights_safetensors", "pytorch_lora_weights_safetensors.report.json"]


def test_batch_inputs_sharing_a_name_in_different_folders(tmp_path):
    src = tmp_path / "in"
    for sub in ("a", "b"):
        (src / sub).mkdir(parents=True)
        shutil.copy(KOHYA, src / sub / "x.safetensors")
    shutil.copy(DIFFUSERS_LORA, src / "y.safetensors")
    out = tmp_path / "out"
    res = cli("convert", src, "--to", "kohya", "-o", out, "-q", code=0)
    assert "3 done, 0 skipped, 0 failed" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a__x.safetensors", "b__x.safetensors", "y.safetensors"]


def test_batch_output_names_do_not_depend_on_order(tmp_path):
    from lycotools.cli_common import batch_outputs

    ins = [tmp_path / "a" / "x.safetensors", tmp_path / "b" / "x.safetensors", tmp_path / "a" / "x.bin",
           tmp_path / "a" / "y.safetensors", tmp_path / "Y.bin"]
    one = dict(batch_outputs(ins, tmp_path / "o"))
    two = dict(batch_outputs(list(reversed(ins)), tmp_path / "o"))
    assert one == two and len(set(one.values())) == len(ins)
    assert {k.relative_to(tmp_path).as_posix(): v.name for k, v in one.items()} == {
        "a/x.safetensors": "x_safetensors.safetensors", "a/x.bin": "x_bin.safetensors",
        "b/x.safetensors": "x.safetensors", "a/y.safetensors": "a__y.safetensors", "Y.bin": "Y.safetensors"}


# ------------------------------------------------------------------------------------------------
# permissions: the umask is read, never set
# ------------------------------------------------------------------------------------------------


def test_outputs_get_the_umask_mode_without_setting_the_umask(tmp_path, monkeypatch):
    from lycotools.io.writer import save_tensors

    old = os.umask(0o027)
    try:
        def no_umask(*_):
            raise AssertionError("os.umask changes the mask of every thread")
        monkeypatch.setattr(os, "umask", no_umask)
        out = save_tensors(tmp_path / "o.safetensors", {"a": torch.ones(2)})
        res = cli("convert", KOHYA, "--to", "peft", "-o", tmp_path / "p", "-q", code=0)
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "p").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "p" / "unet" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o640


def test_reports_are_atomic_and_never_an_input(tmp_path, monkeypatch):
    """--report files go through the same temp-and-rename as outputs: a failure while writing one leaves
    neither a half report nor a temp file, and a report path that is an input is refused."""
    from lycotools.io import writer

    dst = tmp_path / "r.json"
    dst.write_text("old")
    real = Path.write_text

    def boom(self, *a, **k):
        if self.name.endswith(".lycotools-tmp"):
            real(self, "{half")
            raise OSError(errno.EIO, "disk error")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", boom)
    with pytest.raises(OSError):
        writer.write_text_atomic(dst, '{"a": 1}')
    monkeypatch.setattr(Path, "write_text", real)
    assert dst.read_text() == "old" and not leftovers(tmp_path)
    inp = tmp_path / "in.safetensors"
    shutil.copy(KOHYA, inp)
    with pytest.raises(BadInput, match="input"):
        writer.write_text_atomic(inp, "{}", [inp])
    assert inp.read_bytes() == KOHYA.read_bytes()
    out = tmp_path / "o.safetensors"
    res = cli("rank-prune", KOHYA, "-o", out, "--rank", "2", "--report", tmp_path / "rep.json", "-q")
    assert res.exit_code == 0, res.stderr
    assert json.loads((tmp_path / "rep.json").read_text()) and not leftovers(tmp_path)
