"""Writing the user's files so that nothing is lost: every file is written whole or not at all
(a temporary file beside it, synced, then renamed), a failed write is one line saying what to do,
outputs are checked for writability before any long work, and a directory can be locked by one
process (the kernel drops the lock when the process dies, however it dies).
"""
import contextlib
import errno
import os
import uuid

from cli import UserError, check

TEMPORARY_SUFFIX = ".tmp"


def atomic_write(path, write):
    """Call write(binary file) on a temporary file beside path, then rename it to path.

    Either the whole file appears or nothing does: on any error the temporary file is removed
    and the file at path, if any, is untouched. Errors propagate as they are (see write_file
    for the one-line error)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}"
                        f"{TEMPORARY_SUFFIX}")
    try:
        with open(temp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def write_error(path, err):
    """A UserError for a failed write of path, saying what to do."""
    reason = os.strerror(err.errno) if getattr(err, "errno", None) else str(err)
    advice = ("free some disk space" if getattr(err, "errno", None) == errno.ENOSPC
              else "choose a writable location")
    return UserError(f"cannot write {path} ({reason}); {advice}")


@contextlib.contextmanager
def writing(path):
    """An OSError inside the block (a full disk, a read-only place) becomes write_error(path)."""
    try:
        yield
    except OSError as err:
        raise write_error(path, err) from None


def write_file(path, write):
    """The write path of every file the project writes for the user: atomic_write, with a failed
    write as one line naming the file (the file at path, if any, is then untouched)."""
    with writing(path):
        atomic_write(path, write)


def check_writable(path, what="--out"):
    """Fail early, before any long work, if `path` (a file to be written) cannot be created: its
    directory, or the nearest existing ancestor, must be a writable directory."""
    check(not os.path.isdir(path), f"{what} {path} is a directory; give a file name")
    check_writable_dir(os.path.dirname(os.path.abspath(path)), what, path)


def check_writable_dir(directory, what="--out", shown=None):
    """Fail early unless `directory` exists as a writable directory or can be created."""
    shown = shown or directory
    probe = os.path.abspath(directory)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    check(os.path.isdir(probe), f"{what} {shown}: {probe} is not a directory; choose another path")
    try:  # a file in it, removed at once: catches read-only mounts, /proc and permissions alike
        with open(os.path.join(probe, f".write-test-{uuid.uuid4().hex[:8]}"), "xb") as f:
            name = f.name
        os.remove(name)
    except OSError as e:
        raise UserError(f"{what} {shown}: cannot write in {probe} ({os.strerror(e.errno)}); "
                        "choose a writable location") from None


def remove_stale_temporaries(directory):
    """Delete the temporary files atomic_write leaves when a process is killed mid-write
    (.<name>.<12 hex digits>.tmp). Call it only while holding the directory's lock, when no
    write of ours can be in flight. Returns the names removed."""
    removed = []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        parts = name.rsplit(".", 2)
        if name.startswith(".") and name.endswith(TEMPORARY_SUFFIX) and len(parts) == 3 \
                and len(parts[1]) == 12 and all(c in "0123456789abcdef" for c in parts[1]):
            os.remove(os.path.join(directory, name))
            removed.append(name)
    return removed


class DirectoryLock:
    """An exclusive lock on a directory for one process (fcntl.flock on its .lock file): the
    kernel drops it when the process ends, however it ends, so kill -9 leaves no stale lock. A
    second holder gets a UserError naming the process that holds it."""

    NAME = ".lock"

    def __init__(self, directory, what="run directory"):
        self.directory, self.what, self.file = directory, what, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return self
        path = os.path.join(self.directory, self.NAME)
        with writing(path):  # a full disk or a read-only place: one line
            os.makedirs(self.directory, exist_ok=True)
            # unbuffered: a failed write fails once, here, and close() has nothing left to flush
            self.file = open(path, "a+b", buffering=0)
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().decode(errors="replace").strip() or "another process"
            self.__exit__()
            raise UserError(f"the {self.what} {self.directory} is in use by {holder}; wait for it "
                            "to finish or choose another --out") from None
        try:
            with writing(path):  # who holds the lock, for the message of a second holder
                self.file.seek(0)
                self.file.truncate()
                self.file.write(f"process {os.getpid()}".encode())
        except UserError:
            self._remove_if_empty(path)
            self.__exit__()
            raise
        return self

    def _remove_if_empty(self, path):
        """A lock file that could not record its holder (a full disk) is removed, while still
        held, rather than left empty beside the user's files."""
        with contextlib.suppress(OSError):
            if os.fstat(self.file.fileno()).st_size == 0:
                os.remove(path)

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # closing the file releases the lock
            self.file = None
