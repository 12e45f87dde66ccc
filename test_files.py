"""files.py: an atomic write syncs the temporary file before it renames it; what a write killed
in the middle leaves is exactly what the cleaner removes; the directory lock refuses a second
holder of its own kind and is free again once the holder dies; a failed write is one line."""
import errno
import os
import signal
import subprocess
import sys

import pytest

import cli
import files

HERE = os.path.dirname(os.path.abspath(__file__))


def test_the_temporary_file_is_synced_before_it_is_renamed(tmp_path, monkeypatch):
    """The order of the system calls: the data, then fsync of the temporary file's descriptor,
    then the rename of that same file onto the target (a crash between them leaves the old file
    or the whole new one, never a renamed file whose data is not on disk)."""
    calls, sizes = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        sizes.append(os.fstat(fd).st_size)  # what the fsync makes durable: all of it
        real_fsync(fd)

    def replace(src, dst):
        calls.append(("replace", os.path.abspath(src), os.path.abspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    target = tmp_path / "out.bin"
    files.atomic_write(str(target), lambda f: f.write(b"payload"))
    assert [c[0] for c in calls] == ["fsync", "replace"]
    assert calls[0][1] == calls[1][1] != str(target) and calls[1][2] == str(target)
    assert target.read_bytes() == b"payload" and sizes == [len(b"payload")]


def test_a_killed_write_leaves_what_the_cleaner_removes(tmp_path):
    """A process killed (SIGKILL) in the middle of an atomic write leaves its temporary file and
    the old target untouched; remove_stale_temporaries removes exactly that file, and neither the
    target nor a user's own hidden .tmp file."""
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"the old checkpoint")
    (tmp_path / ".notes.tmp").write_text("the user's")
    code = ("import sys, time, files\n"
            "def write(f):\n"
            "    f.write(b'half of a new checkpoint'); f.flush()\n"
            "    print('writing', flush=True); time.sleep(60)\n"
            "files.atomic_write(sys.argv[1], write)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], cwd=HERE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    left = sorted(set(os.listdir(tmp_path)) - {"ckpt.pt", ".notes.tmp"})
    assert len(left) == 1 and left[0].startswith(".ckpt.pt.")
    assert target.read_bytes() == b"the old checkpoint"
    assert files.remove_stale_temporaries(str(tmp_path)) == left
    assert sorted(os.listdir(tmp_path)) == [".notes.tmp", "ckpt.pt"]


def test_a_second_directory_lock_is_refused_until_the_holder_dies(tmp_path):
    """Two DirectoryLocks on one directory, in two processes: the second gets one line naming
    the first's process id; after kill -9 of the first, the lock is taken at once. A lock that
    waited for the holder instead of refusing fails here in 10 seconds (an alarm)."""
    code = ("import sys, files\n"
            "with files.DirectoryLock(sys.argv[1]):\n"
            "    print('locked', flush=True); sys.stdin.read()\n")  # held until killed
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=HERE,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def waited(*_):
        raise TimeoutError("the second DirectoryLock waited for the first instead of refusing")
    previous = signal.signal(signal.SIGALRM, waited)
    try:
        assert holder.stdout.readline().strip() == "locked"
        signal.alarm(10)
        with pytest.raises(cli.UserError) as excinfo:
            with files.DirectoryLock(str(tmp_path)):
                pass
        signal.alarm(0)
        message = str(excinfo.value)
        assert f"in use by process {holder.pid}" in message and "\n" not in message
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with files.DirectoryLock(str(tmp_path)):
        with open(tmp_path / files.DirectoryLock.NAME) as f:
            assert f.read() == f"process {os.getpid()}"


@pytest.mark.parametrize("err, advice", [(errno.ENOSPC, "free some disk space"),
                                         (errno.EACCES, "choose a writable location")])
def test_a_failed_write_is_one_line_and_keeps_the_old_file(tmp_path, err, advice):
    target = tmp_path / "grid.png"
    target.write_bytes(b"old")

    def failing(f):
        f.write(b"new and partial")
        raise OSError(err, os.strerror(err))

    with pytest.raises(cli.UserError) as excinfo:
        files.write_file(str(target), failing)
    message = str(excinfo.value)
    assert str(target) in message and advice in message and "\n" not in message
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["grid.png"]
