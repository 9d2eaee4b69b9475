"""Atomic, streaming safetensors writer with the metadata users' tools read.

* Atomic: bytes go to a hidden temp file beside the target, renamed over it only when complete;
  an error or an interrupt leaves no partial output, nor a temp file (under the CLI, SIGTERM and
  SIGHUP too: ``catch_signals``). A full disk is ``DiskFull``, naming the output.
* Streaming: each tensor is written to disk when added, so peak memory stays near one tensor.
  The header (which must precede the data) is assembled at the end from a spool file, or written
  first when the caller declares the tensors up front (``plan``), which avoids the extra copy.
* Same bytes as ``safetensors.torch.save`` for the same tensors and metadata (same tensor order
  and header layout), so ``sshs_model_hash`` / ``sshs_legacy_hash`` agree with kohya's and A1111's.
* Refuses to overwrite an input, or an existing file unless ``overwrite=True`` (``input_clash``).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import os
import queue
import shutil
import signal
import struct
import tempfile
import threading
from pathlib import Path

import torch

from ..errors import BadInput, LycoError
from .safetensors_format import dtype_name, header_bytes, serial_order
from .threads import signals_to_main_thread

HASH_PLACEHOLDER = "0" * 64  # bare lowercase hex, as kohya writes it (sha256 hexdigest)
LEGACY_PLACEHOLDER = "0" * 8
_LEGACY_START, _LEGACY_LEN = 0x100000, 0x10000
_INFLIGHT_BYTES = 256 << 20  # planned mode: tensor bytes handed to the writer/hasher threads, not yet done
_DIRECT_MIN = 64 << 20  # outputs at least this big bypass the page cache (see _DirectSink) ...
_DIRECT_FS = {"ext4", "ext3", "xfs", "btrfs", "f2fs", "bcachefs"}  # ... on these local filesystems


def direct_io_ok(folder: Path) -> bool:
    """Whether files in ``folder`` are written with O_DIRECT: only on local block filesystems, where it
    saves the page-cache copy (on network and FUSE mounts a direct write is a synchronous round trip).
    ``LYCOTOOLS_DIRECT_IO=0`` or ``=1`` decides instead."""
    if not hasattr(os, "O_DIRECT"):
        return False
    env = os.environ.get("LYCOTOOLS_DIRECT_IO")
    if env is not None:
        return env.strip().lower() not in ("0", "", "no", "false", "off")
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    target, best, fstype = str(Path(folder).resolve()), "", None
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mp = parts[1].replace("\\040", " ")
        if (target == mp or target.startswith(mp.rstrip("/") + "/")) and len(mp) >= len(best):
            best, fstype = mp, parts[2]
    return fstype in _DIRECT_FS


TMP_SUFFIX = ".lycotools-tmp"
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFull(LycoError):
    """The disk (or the user's quota) filled up while an output was written: exit status 1, naming
    the output; the temp file is gone, so nothing was written."""

    def __init__(self, output, err: OSError):
        super().__init__(output, f"cannot write: {os.strerror(err.errno).lower()}; nothing was written",
                         hint="free some space, or write the output elsewhere")


def _raise_if_full(e: BaseException, output):
    """Turn a disk-full OSError into ``DiskFull(output)``; other errors are left to the caller."""
    if isinstance(e, DiskFull) and e.path != str(output):
        raise DiskFull(output, e.__cause__) from e.__cause__  # a file inside a folder output: name the folder
    if isinstance(e, OSError) and e.errno in _DISK_FULL:
        raise DiskFull(output, e) from e


# ---- temp files and signals -------------------------------------------------------------------
# Every temp file or folder is registered the moment it exists and forgotten the moment it is
# published or removed, so whoever ends the process (the CLI after a signal, or atexit) can remove
# what is left. In the main thread, where Python runs signal handlers, creating + registering and
# publishing + recording are held off from signals (``_guarded``): a signal between the two steps
# would otherwise leave a temp file nobody knows about, or a published output nobody counted.


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised like Ctrl-C so that every ``except BaseException`` cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Run:
    lock = threading.RLock()
    live: dict[Path, bool] = {}  # temp path -> is a folder
    written: list[Path] = []  # outputs published during this command (catch_signals)
    signum: int | None = None  # the first signal caught during this command
    held = 0  # main thread: depth of _guarded sections
    pending: int | None = None  # a signal caught while held, raised when the section ends


def _on_signal(signum, frame):
    """Handler for SIGINT/SIGTERM/SIGHUP (installed by ``catch_signals``); runs in the main thread."""
    if _Run.signum is None:
        _Run.signum = signum
    if _Run.held:
        _Run.pending = signum
    else:
        raise Interrupted(signum)


def check_interrupt():
    """After a signal no thread starts or publishes an output (-j workers stop at their next write)."""
    if _Run.signum is not None:
        raise Interrupted(_Run.signum)


@contextlib.contextmanager
def _guarded():
    """The registry lock, with signals held off while it is held in the main thread. A signal that
    came meanwhile is raised when the section ends (unless an exception is already on its way out;
    then ``check_interrupt`` raises it at the next write)."""
    if threading.current_thread() is not threading.main_thread():
        with _Run.lock:
            yield
        return
    _Run.held += 1
    try:
        with _Run.lock:
            yield
    finally:
        _Run.held -= 1
    if not _Run.held and _Run.pending is not None:
        signum, _Run.pending = _Run.pending, None
        raise Interrupted(signum)


def _new_temp(dst: Path, folder: bool = False):
    """A hidden temp file (returns ``(fd, path)``) or folder (returns ``path``) beside ``dst``, registered."""
    with _guarded():
        check_interrupt()
        kw = dict(prefix=f".{dst.name}.", suffix=TMP_SUFFIX, dir=dst.parent)
        if folder:
            tmp = Path(tempfile.mkdtemp(**kw))
            _Run.live[tmp] = True
            return tmp
        fd, tmp = tempfile.mkstemp(**kw)
        _Run.live[Path(tmp)] = False
        return fd, Path(tmp)


def _discard(tmp: Path):
    """Remove a temp file or folder and forget it."""
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with _guarded():
        _Run.live.pop(tmp, None)


def _publish(tmp: Path, dst: Path):
    """Give the temp file ordinary permissions (mkstemp makes it 0600) and move it into place."""
    os.chmod(tmp, _umask_mode())
    with _guarded():
        check_interrupt()
        os.replace(tmp, dst)
        _Run.live.pop(tmp, None)
        if not any(p in _Run.live for p in dst.parents):  # not a file of a folder output still being built
            _Run.written.append(dst)


def remove_temps():
    """Remove every temp file and folder still registered (an interrupted or failed run's)."""
    with _guarded():
        for tmp, folder in list(_Run.live.items()):
            if folder:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        _Run.live.clear()


atexit.register(remove_temps)  # library use: a KeyboardInterrupt that ends the interpreter


@contextlib.contextmanager
def catch_signals():
    """For one CLI command: SIGINT, SIGTERM and SIGHUP raise ``Interrupted``, so the writers' cleanup
    runs instead of the process dying with temp files on disk; on the way out every temp file left is
    removed. Yields the run's record: ``.signum`` (the first signal) and ``.written`` (published outputs),
    which say whether "no output was written" is true."""
    _Run.written, _Run.signum, _Run.pending = [], None, None
    sigs = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]
    old = {}
    if threading.current_thread() is threading.main_thread():
        for s in sigs:
            if signal.getsignal(s) is not signal.SIG_IGN:  # ignored stays ignored: nohup, background jobs
                old[s] = signal.signal(s, _on_signal)
    try:
        yield _Run
    finally:
        remove_temps()
        for s, h in old.items():
            signal.signal(s, h)
        _Run.signum = _Run.pending = None  # a later command or library call in this process starts afresh


# ---- output checks ----------------------------------------------------------------------------


def clash_checker(inputs):
    """``input_clash`` for many outputs against one list of inputs (a batch): the inputs are looked at
    once, then each output costs a few lookups."""
    same, holds, inside, ids = {}, {}, {}, {}
    for inp in inputs:
        if inp is None:
            continue
        given = Path(inp).absolute()
        real = given.resolve()
        for place in (real, given.parent.resolve() / given.name):
            same.setdefault(place, inp)
            for parent in place.parents:
                holds.setdefault(parent, inp)
        if real.is_dir():
            inside.setdefault(real, inp)
        with contextlib.suppress(OSError):
            st = os.stat(inp)
            ids.setdefault((st.st_dev, st.st_ino), inp)

    def check(output) -> str | None:
        out = Path(output).absolute().resolve()
        try:
            st = os.stat(output)
            inp = ids.get((st.st_dev, st.st_ino))
        except OSError:  # does not exist yet
            inp = None
        inp = same.get(out, inp)
        if inp is not None:
            return f"output would overwrite an input ({inp}); choose another output path"
        if out in holds:
            return (f"output folder holds the input {holds[out]}, which replacing it would delete; "
                    "choose another output path")
        for parent in out.parents:
            if parent in inside:
                return f"output is inside the input folder {inside[parent]}; choose a path outside it"
        return None

    return check


def input_clash(output, inputs) -> str | None:
    """Why writing ``output`` (a file, or a folder that --overwrite replaces whole) would change an
    input, or None. Compares real locations: symlinks resolved, hard links by device and inode; an
    input counts both as its real file and as the name it was given (a symlink inside the output
    folder is deleted with it). Refused: the same file, an output folder holding an input, and an
    output inside an input folder (a diffusers or PEFT model would gain or lose a file)."""
    return clash_checker(inputs)(output)


def check_output(path, inputs=(), overwrite: bool = False) -> Path:
    """Validate a file output before any work is done: never an input (see ``input_clash``)."""
    path = Path(path)
    why = input_clash(path, inputs)
    if why:
        raise BadInput(path, why)
    if path.exists() and not overwrite:
        raise BadInput(path, "output already exists", hint="pass --overwrite to replace it")
    if path.exists() and path.is_dir():
        raise BadInput(path, "output is a folder; give a file name")
    if not path.parent.exists():
        raise BadInput(path, f"output folder {path.parent} does not exist")
    return path


def _proc_umask() -> int | None:
    """The umask as Linux shows it in /proc (since 4.7), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _import_umask() -> int:
    """The umask at import, where /proc cannot tell: ``os.umask`` reads only by setting, which for a
    moment gives every thread's new files the wrong mode, so it is done once, before any -j worker."""
    mask = _proc_umask()
    if mask is None:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _import_umask()


def _umask_mode(base: int = 0o666) -> int:
    """``base`` less the process umask: the mode an ordinary open()/mkdir() would give. Read from
    /proc each time (race-free, and current if the program changed it)."""
    mask = _proc_umask()
    return base & ~(_UMASK_AT_IMPORT if mask is None else mask)


def check_output_folder(path, inputs=(), overwrite: bool = False) -> Path:
    """Validate a folder output (diffusers, PEFT) before any work is done. ``atomic_folder`` replaces
    an existing output whole, so a folder holding an input is refused (see ``input_clash``)."""
    path = Path(path)
    why = input_clash(path, inputs)
    if why:
        raise BadInput(path, why)
    if path.exists() and not overwrite:
        raise BadInput(path, "output already exists", hint="pass --overwrite to replace it")
    if not path.parent.exists():
        raise BadInput(path, f"output folder {path.parent} does not exist")
    return path


@contextlib.contextmanager
def atomic_folder(output):
    """Build a folder output in a hidden temp folder beside it; publish it by rename when the block
    ends cleanly (replacing what was there), remove it on any error: never a half-written folder.
    The old output is first renamed aside, so it is never gone before the new one is in place.
    Call ``check_output_folder`` first: this replaces whatever ``output`` holds."""
    output = Path(output)
    tmp = _new_temp(output, folder=True)
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(0o777))  # mkdtemp makes it 0700
        old = None
        with _guarded():
            check_interrupt()
            if output.is_dir() and not output.is_symlink():
                old = _new_temp(output, folder=True)
                os.replace(output, old)  # a folder may replace an empty one
            elif output.exists() or output.is_symlink():
                output.unlink()
            try:
                os.replace(tmp, output)
            except BaseException:
                if old is not None:
                    os.replace(old, output)
                raise
            _Run.live.pop(tmp, None)
            _Run.written.append(output)
        if old is not None:
            _discard(old)
    except BaseException as e:
        _discard(tmp)
        _raise_if_full(e, output)
        raise


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class _DirectSink:
    """Sequential file writes that bypass the page cache (``O_DIRECT``), for big outputs.

    A buffered write costs a kernel copy of every byte into the page cache and leaves it all dirty
    for the final fsync; on the 2-core bench machine that copy took as much CPU as the SHA-256 of
    the same bytes. Here the bytes are gathered into an aligned staging buffer (one copy, run by
    torch without the GIL) and handed to the disk in 16 MiB blocks. Where the filesystem refuses
    ``O_DIRECT`` (tmpfs, some network mounts) the same blocks go through ordinary writes."""

    CHUNK = 16 << 20
    ALIGN = 4096

    def __init__(self, path: Path, fallback_fd: int):
        import mmap

        self._fd = os.open(path, os.O_WRONLY | os.O_DIRECT)  # OSError where unsupported: caller falls back
        self._fallback = fallback_fd
        self._mm = mmap.mmap(-1, self.CHUNK)  # page-aligned, as O_DIRECT needs
        self._buf = torch.frombuffer(self._mm, dtype=torch.uint8)
        self._fill = 0  # bytes staged
        self._at = 0  # file offset of the staging buffer (a multiple of CHUNK)

    def write(self, data: memoryview):
        if not len(data):
            return
        if data.readonly:  # torch.frombuffer wants a writable buffer (only the small header is not)
            data = memoryview(bytearray(data))
        src = torch.frombuffer(data, dtype=torch.uint8)
        done = 0
        while done < len(data):
            n = min(self.CHUNK - self._fill, len(data) - done)
            self._buf[self._fill:self._fill + n].copy_(src[done:done + n])
            self._fill += n
            done += n
            if self._fill == self.CHUNK:
                self._flush(self.CHUNK)

    def _flush(self, nbytes: int):
        view = memoryview(self._mm)[:nbytes]
        try:
            while view:
                if self._fd is not None:
                    n = os.pwrite(self._fd, view, self._at)
                else:
                    n = os.pwrite(self._fallback, view, self._at)
                view = view[n:]
                self._at += n
        except OSError as e:
            if self._fd is None or e.errno != errno.EINVAL or self._at % self.CHUNK:
                raise
            os.close(self._fd)  # accepted at open, refused at write: ordinary writes from here on
            self._fd = None
            return self._flush(len(view))
        finally:
            view.release()
        self._fill = 0

    def close(self, size: int):
        """Write what is staged (padded to the alignment) and cut the file to ``size`` bytes."""
        try:
            if self._fill:
                pad = -self._fill % self.ALIGN
                self._buf[self._fill:self._fill + pad].zero_()
                self._flush(self._fill + pad)
            os.ftruncate(self._fallback, size)
        finally:
            self.abort()

    def abort(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._buf = None
        try:
            self._mm.close()
        except BufferError:  # a view still alive (an exception's traceback): the GC unmaps it later
            pass


class SafetensorsWriter:
    """Write tensors one at a time; ``commit()`` publishes the file atomically.

    Use as a context manager: a clean exit commits, an exception aborts and removes temp files.
    ``metadata`` values must be strings. ``hashes=True`` adds ``sshs_model_hash`` and
    ``sshs_legacy_hash`` computed on the tensors as saved (kohya's definition: the data section
    of a file carrying only the ``ss_*`` metadata).
    """

    def __init__(self, path, metadata: dict | None = None, *, inputs=(), overwrite: bool = False,
                 hashes: bool = True, plan: list[tuple[str, torch.dtype, tuple]] | None = None):
        self.path = check_output(path, inputs, overwrite)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.hashes = hashes
        self._entries: dict[str, tuple[str, tuple, int, int]] = {}  # name -> (dtype, shape, spool offset, nbytes)
        self._closed = False
        self._plan = None
        self._queues: list[queue.Queue] = []  # planned mode: one per worker thread (write, hash)
        self._threads: list[threading.Thread] = []
        self._fh = None
        fd, self._tmp = _new_temp(self.path)
        try:
            self._fh = os.fdopen(fd, "w+b")
            if plan is not None:
                self._start_planned(plan)
        except BaseException as e:  # no __exit__ will run: clean up here
            if self._fh is None:
                os.close(fd)
            self.abort()
            _raise_if_full(e, self.path)
            raise

    # ---- planned mode: header first, tensors must arrive in serial order -------------------------
    def _start_planned(self, plan):
        entries = serial_order([(n, dtype_name(d), tuple(int(s) for s in shp)) for n, d, shp in plan])
        infos, off = [], 0
        for n, dt, shp in entries:
            nb = _nbytes(dt, shp)
            infos.append((n, dt, shp, off, off + nb))
            off += nb
        self._plan = infos
        self._plan_pos = 0
        self._sha = hashlib.sha256()
        self._legacy_window = self._legacy_offset(infos)
        self._legacy_buf = bytearray()
        meta = dict(self.metadata)
        if self.hashes:
            meta["sshs_model_hash"] = HASH_PLACEHOLDER
            meta["sshs_legacy_hash"] = LEGACY_PLACEHOLDER
        head = header_bytes(infos, meta)
        self._data_start = 8 + len(head)
        self._head_len = len(head)
        self._sink = None
        if off >= _DIRECT_MIN and direct_io_ok(self.path.parent):
            self._fh.flush()
            try:
                self._sink = _DirectSink(self._tmp, self._fh.fileno())
            except OSError:
                self._sink = None
        if self._sink is not None:
            self._sink.write(memoryview(struct.pack("<Q", len(head)) + head))
        else:
            self._fh.write(struct.pack("<Q", len(head)))
            self._fh.write(head)
        # writing and hashing each run in a thread of their own, overlapping each other and the
        # caller's reading and math (both release the GIL on big buffers). What is in flight is
        # bounded in bytes, not tensors: the caller can then run ahead through stretches of cheap
        # tensors (a VAE copied unchanged) while the hasher catches up during the costly ones.
        self._error: BaseException | None = None
        self._inflight = 0
        self._budget = threading.Condition()
        for name, step in (("writer", self._write_step), ("hasher", self._hash_step)):
            if step == self._hash_step and not self.hashes:
                continue
            q: queue.Queue = queue.Queue()
            t = threading.Thread(target=self._drain, args=(q, step), name=f"lycotools-{name}", daemon=True)
            self._queues.append(q)
            self._threads.append(t)
            t.start()

    def _write_step(self, data: memoryview, pos: int):
        if self._sink is not None:
            self._sink.write(data)
        else:
            self._fh.write(data)

    def _hash_step(self, data: memoryview, pos: int):
        self._feed_hash(data, pos)

    def _drain(self, q: queue.Queue, step):
        signals_to_main_thread()
        while True:
            item = q.get()
            if item is None:
                return
            try:
                if self._error is None:  # after an error: keep draining so add() never blocks
                    step(item[0], item[1])
            except BaseException as e:  # reported by the next add() or by commit()
                self._error = e
            finally:
                with self._budget:
                    item[3][0] -= 1
                    if not item[3][0]:  # written and hashed: its bytes leave the budget
                        self._inflight -= len(item[0])
                        self._budget.notify_all()

    def _stop_thread(self):
        for q, t in zip(self._queues, self._threads):
            if t.is_alive():
                q.put(None)
        for t in self._threads:
            t.join()

    def _legacy_offset(self, infos) -> int:
        """Data-section offset where kohya's legacy-hash window starts, in the ss-only serialization."""
        ss_meta = {k: v for k, v in self.metadata.items() if k.startswith("ss_")}
        head_len = 8 + len(header_bytes(infos, ss_meta or None))
        return _LEGACY_START - head_len

    def _feed_hash(self, data: memoryview, pos: int):
        self._sha.update(data)
        lo = max(self._legacy_window, pos)
        hi = min(self._legacy_window + _LEGACY_LEN, pos + len(data))
        if hi > lo:
            self._legacy_buf += data[lo - pos:hi - pos]

    # ---- adding tensors -------------------------------------------------------------------------
    def add(self, name: str, tensor: torch.Tensor):
        if self._closed:
            raise RuntimeError("writer is closed")
        check_interrupt()
        try:
            self._add(name, tensor)
        except OSError as e:
            if e.errno in _DISK_FULL:
                self.abort()
                raise DiskFull(self.path, e) from e
            raise

    def _add(self, name: str, tensor: torch.Tensor):
        data = _tensor_bytes(tensor)
        dt = dtype_name(tensor.dtype)
        shape = tuple(int(s) for s in tensor.shape)
        if self._plan is not None:
            if self._error is not None:
                raise self._error
            n, pdt, pshape, begin, end = self._plan[self._plan_pos]
            if (n, pdt, pshape) != (name, dt, shape):
                raise RuntimeError(f"planned writer expected {n} {pdt}{list(pshape)}, got {name} {dt}{list(shape)}")
            with self._budget:
                while self._inflight and self._inflight + len(data) > _INFLIGHT_BYTES and self._error is None:
                    self._budget.wait()
                self._inflight += len(data)
            # the tensor keeps the bytes alive until written and hashed; the list counts the threads left
            item = (data, begin, tensor, [len(self._queues)])
            for q in self._queues:
                q.put(item)
            self._plan_pos += 1
            return
        if name in self._entries:
            raise RuntimeError(f"tensor {name!r} added twice")
        off = self._fh.tell()
        self._fh.write(data)
        self._entries[name] = (dt, shape, off, len(data))

    def __contains__(self, name):
        return name in self._entries

    @property
    def expected_order(self) -> list[str]:
        """In planned mode, the names in the order ``add`` must be called."""
        return [i[0] for i in self._plan] if self._plan is not None else []

    # ---- finishing ------------------------------------------------------------------------------
    def commit(self) -> Path:
        if self._closed:
            return self.path
        try:
            if self._plan is not None:
                self._finish_planned()
            else:
                self._finish_spooled()
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            _publish(self._tmp, self.path)
        except BaseException as e:
            self.abort()
            _raise_if_full(e, self.path)
            raise
        self._closed = True
        return self.path

    def _finish_planned(self):
        self._stop_thread()
        if self._error is not None:
            raise self._error
        if self._plan_pos != len(self._plan):
            missing = self._plan[self._plan_pos][0]
            raise RuntimeError(f"planned writer closed before tensor {missing!r} was written")
        if self._sink is not None:
            sink, self._sink = self._sink, None
            sink.close(self._data_start + self._plan[-1][4] if self._plan else self._data_start)
        if self.hashes:
            model_hash = self._sha.hexdigest()
            legacy = hashlib.sha256(bytes(self._legacy_buf)).hexdigest()[:8]
            meta = dict(self.metadata, sshs_model_hash=model_hash, sshs_legacy_hash=legacy)
            self.metadata = meta
            head = header_bytes(self._plan, meta)
            if len(head) != self._head_len:  # metadata must be complete when a planned writer starts
                raise RuntimeError("planned writer: metadata changed after the header was written")
            self._fh.seek(8)
            self._fh.write(head)  # same length: the placeholders have the hashes' lengths

    def _finish_spooled(self):
        spool = self._fh
        entries = serial_order([(n, e[0], e[1], e[2], e[3]) for n, e in self._entries.items()])
        infos, off = [], 0
        for n, dt, shp, _, nb in entries:
            infos.append((n, dt, shp, off, off + nb))
            off += nb
        meta = dict(self.metadata)
        if self.hashes:
            sha = hashlib.sha256()
            legacy_at = self._legacy_offset(infos)
            legacy = bytearray()
            pos = 0
            for _, _, _, soff, nb in entries:
                for chunk in _read_range(spool, soff, nb):
                    sha.update(chunk)
                    lo, hi = max(legacy_at, pos), min(legacy_at + _LEGACY_LEN, pos + len(chunk))
                    if hi > lo:
                        legacy += chunk[lo - pos:hi - pos]
                    pos += len(chunk)
            meta["sshs_model_hash"] = sha.hexdigest()
            meta["sshs_legacy_hash"] = hashlib.sha256(bytes(legacy)).hexdigest()[:8]
        self.metadata = meta
        head = header_bytes(infos, meta)
        fd, final_tmp = _new_temp(self.path)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(struct.pack("<Q", len(head)))
                out.write(head)
                for _, _, _, soff, nb in entries:
                    for chunk in _read_range(spool, soff, nb):
                        out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            _discard(final_tmp)
            raise
        spool.close()
        _discard(self._tmp)
        self._tmp = final_tmp
        self._fh = open(self._tmp, "rb")

    def abort(self):
        self._closed = True
        self._stop_thread()
        if getattr(self, "_sink", None) is not None:
            self._sink.abort()
            self._sink = None
        try:
            self._fh.close()
        except Exception:
            pass
        _discard(self._tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()
        return False


def _nbytes(dt: str, shape) -> int:
    from .safetensors_format import DTYPE_NAMES

    n = torch.empty((), dtype=DTYPE_NAMES[dt]).element_size()
    for s in shape:
        n *= int(s)
    return n


def _read_range(fh, offset: int, nbytes: int, chunk: int = 16 * 1024 * 1024):
    fh.seek(offset)
    left = nbytes
    while left > 0:
        buf = fh.read(min(chunk, left))
        if not buf:
            raise OSError("spool file ended early")
        left -= len(buf)
        yield buf


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None, **kw) -> Path:
    """Write a whole dict (small outputs: adapters, embeddings) atomically with hashes."""
    plan = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with SafetensorsWriter(path, metadata, plan=plan, **kw) as w:
        for name, _, _ in serial_order([(k, dtype_name(t.dtype), None) for k, t in tensors.items()]):
            w.add(name, tensors[name])
    return w.path


@contextlib.contextmanager
def atomic_file(dst):
    """A temp path beside ``dst`` for a writer that takes a path (``torch.save``, a copy); published as
    ``dst`` when the block ends cleanly, removed on any error or signal. Check ``dst`` first."""
    dst = Path(dst)
    fd, tmp = _new_temp(dst)
    os.close(fd)
    try:
        yield tmp
        _publish(tmp, dst)
    except BaseException as e:
        _discard(tmp)
        _raise_if_full(e, dst)
        raise


def write_text_atomic(dst, text: str, inputs=()) -> Path:
    """A small text output (a ``--report``): never an input, never half-written, replaced if it exists."""
    dst = Path(dst)
    why = input_clash(dst, inputs)
    if why:
        raise BadInput(dst, why)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(dst) as tmp:
        Path(tmp).write_text(text)
    return dst
