"""Files written whole or not at all: `atomic_write`, which every writer of results, weights and caches goes through."""
import os


def atomic_write(path, write):
    """Call `write(tmp)` on a temporary name beside `path`, then rename it over `path`: nobody ever sees half a file,
    and a failure leaves nothing behind."""
    path = os.fspath(path)
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
