"""Files written whole or not at all: `atomic_write`, which every writer of results, weights and caches goes through."""
import os
import tempfile


def _umask():
    """The process's umask, read without changing it where the OS allows (setting it is process-wide, racing threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write):
    """Call `write(tmp)` on a temporary name beside `path`, then rename it over `path`: nobody ever sees half a file,
    and a failure leaves nothing behind. The file gets the mode a plain `open()` would give it (0o666 minus the
    umask), whatever mode the temporary file was made with (mkstemp makes 0o600)."""
    path = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
