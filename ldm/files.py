"""Files written whole or not at all: `atomic_write`, which every writer of results, weights and caches goes through."""
import os
import re
import tempfile

# How a failed write shows through the writers we call: OSError from Python, "unexpected pos" / "file write failed"
# from torch's zip writer, "I/O error ... (os error 27)" from safetensors.
_WRITE_FAILED = re.compile(r"unexpected pos|file write failed|I/O error|os error \d+", re.I)


def _umask():
    """The process's umask, read without changing it where the OS allows (setting it is process-wide: racing threads
    could create files with the wrong mode)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, ValueError, StopIteration):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def atomic_write(path, write):
    """Call `write(tmp)` on a temporary name beside `path` (folders made), then rename it over `path`: nobody ever
    sees half a file, and a failure leaves nothing behind. The file gets the mode a plain `open()` would give it
    (0o666 minus the umask), whatever mode the temporary file was made with (mkstemp makes 0o600)."""
    path = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) or (isinstance(e, Exception) and _WRITE_FAILED.search(str(e))):
            reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise OSError(f"cannot write {path} ({reason}); free disk space, or check the folder is writable and the "
                          "file-size limit (ulimit -f), or write elsewhere") from None
        raise
    return path


def new_folder(path):
    """Create the folder `path`, or `path_1`, `path_2`, ... if it exists; the name created. mkdir is atomic, so two
    processes asking for the same name at the same moment (two runs started in the same second) never share one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for i in range(10_000):
        name = f"{path}_{i}" if i else path
        try:
            os.mkdir(name)
            return name
        except FileExistsError:
            continue
    raise OSError(f"cannot create a new folder beside {path}: 10000 names taken; clean up its parent folder")
