"""Fuzzed readers: seeded byte flips, truncations and header edits of valid files, a few hundred per reader.

Every mutated file must end in a clean load or one clean error: a ValueError or OSError (what `one_line_errors`
turns into one `error: ...` line) whose message is one line; never another exception (a traceback for the user), a
call longer than TIME_LIMIT s (a hang), or memory of the size a header claims (the process's peak RSS may not grow by
more than RSS_LIMIT_MB over all the mutations). Header edits aim at the sizes a reader might trust: a safetensors
header's length and shapes, a zip's central directory, a PNG's and a JPEG's dimensions, YAML aliases.

The readers run in-process (and a handful through scripts/txt2img.py); `-s` shows how many mutations each was given and how they ended (the figures of the
README's reliability section). The mutations are seeded, but torch.save writes a random serialization id into every
zip, so the split between loaded and refused of the three zip readers varies by a few from run to run.
"""
import io
import json
import random
import re
import resource
import signal
import struct
import time
import zlib

import pytest
import torch
from PIL import Image
from safetensors.torch import save as safetensors_bytes

from ldm.checkpoint import read_state_dict
from ldm.config import check_targets, read_config_file
from ldm.images import load_rgb
from ldm.modules.embedding_manager import read_embeddings
from ldm.modules.encoders.modules import FrozenCLIPEmbedder

from .conftest import TINY_FINETUNE

N = 300  # mutations per reader
TIME_LIMIT = 10.0  # seconds per call, generous for a loaded 2-core machine; the slowest call is reported
RSS_LIMIT_MB = 500
TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=12, num_attention_heads=4)
HUGE = (2**31, 2**40, 2**62, 10**18)


class Hang(BaseException):  # not Exception: readers that wrap every Exception must not hide it
    pass


def _alarm(*_):
    raise Hang()


def _flip(data, rng):
    data = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= rng.randint(1, 255)
    return bytes(data)


def _huge_number_in(data, start, end, rng):
    """`data` with one run of digits between `start` and `end` replaced by a huge number (a claimed size)."""
    runs = [m for m in re.finditer(rb"\d+", data[start:end])]
    if not runs:
        return _flip(data, rng)
    m = rng.choice(runs)
    return data[:start + m.start()] + str(rng.choice(HUGE)).encode() + data[start + m.end():]


def _put(data, offset, value, fmt):
    size = struct.calcsize(fmt)
    offset = max(0, min(offset, len(data) - size))
    return data[:offset] + struct.pack(fmt, value) + data[offset + size:]


def safetensors_header(data, rng):
    n = int.from_bytes(data[:8], "little")
    if rng.random() < 0.3:  # the header's length itself
        return _put(data, 0, rng.choice(HUGE + (n + 1, n - 1, 0)), "<Q")
    return _huge_number_in(data, 8, 8 + n, rng)  # a shape or an offset


def zip_header(data, rng):
    # central directory and end record (sizes, offsets, counts), or a local header
    where = data.rfind(b"PK\x01\x02") if rng.random() < 0.7 else data.find(b"PK\x03\x04")
    offset = max(where, 0) + rng.randrange(8, 46)
    return _put(data, offset, rng.choice((0xFFFFFFFF, 0x7FFFFFFF, 0, rng.randrange(2**32))), "<I")


def png_header(data, rng):
    return _put(data, rng.choice((16, 20)), rng.choice((0, 2**31 - 1, 0xFFFFFFFF, 65535, 100000)), ">I")


def jpeg_header(data, rng):
    sof = data.find(b"\xff\xc0")
    return _put(data, sof + rng.choice((5, 7)), rng.choice((0, 65535, 1, 30000)), ">H") if sof >= 0 else _flip(data, rng)


def yaml_header(data, rng):
    edits = [b"a: &x [1]\nb: [*x, *x, *x]\n" * 3, b"x: !!python/object/apply:os.system ['touch pwned']\n",
             b"[" * 5000, b"<<: *missing\n", b"k: ${oops\n", b"\t\x00: \xff\xfe\n", b"model: ${model}\n",
             b"lightning: {trainer: {max_steps: 1e400}}\n"]
    at = rng.choice([0, len(data), rng.randrange(len(data))])
    return data[:at] + rng.choice(edits) + data[at:]


def mutations(data, header, seed):
    """N mutated copies of `data`: byte flips, truncations, header edits in turn."""
    rng = random.Random(seed)
    for i in range(N):
        kind = i % 3
        if kind == 0:
            yield "flip", _flip(data, rng)
        elif kind == 1:
            yield "truncate", data[: rng.randrange(len(data))]
        else:
            yield "header", header(data, rng)


# --- the valid files ---------------------------------------------------------------------------------------------
def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3, generator=g),
            "model.diffusion_model.out.2.bias": torch.randn(4, generator=g),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.randn(16, 8, generator=g)}


def _canonical(data):
    """A safetensors file with its header's keys sorted: safetensors writes its metadata in a random order (a Rust
    HashMap), and the same mutations must meet the same bytes on every run."""
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (n - len(header))
    return data[:8] + header + data[8 + n:]


def _bytes(save):
    buffer = io.BytesIO()
    save(buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def embedder():
    emb = FrozenCLIPEmbedder(text_config=TEXT, concat_kv={"layers": [9, 10, 11]})
    with torch.no_grad():  # the same adapter bytes, so the same mutations end the same way on every run
        for p in emb.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    return emb


@pytest.fixture(scope="module")
def valid(embedder, tmp_path_factory):
    """{reader name: (file name, bytes, header edit, reader)}; the reader takes the mutated file's path."""
    t = tmp_path_factory.mktemp("valid")
    embedder.adapter_save(t / "adapter")
    adapter = lambda p: embedder.adapter_load(p)  # noqa: E731
    image = Image.effect_mandelbrot((48, 40), (-2, -1.5, 1, 1.5), 30).convert("RGB")
    ti = {"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": torch.randn(1, 64, generator=torch.Generator().manual_seed(0))}}
    with open(TINY_FINETUNE, "rb") as f:
        config = f.read()

    def read_config(path):
        check_targets(read_config_file(path))

    def ckpt_bytes(buffer):
        torch.save({"state_dict": _state()}, buffer)

    return {
        "base checkpoint .ckpt": ("model.ckpt", _bytes(ckpt_bytes), zip_header, read_state_dict),
        "base checkpoint .safetensors": ("model.safetensors", _canonical(safetensors_bytes(_state())), safetensors_header, read_state_dict),
        "adapter catversion.safetensors": ("catversion.safetensors", _canonical((t / "adapter" / "catversion.safetensors").read_bytes()),
                                           safetensors_header, adapter),
        "adapter pytorch_adapter.bin": ("pytorch_adapter.bin", (t / "adapter" / "pytorch_adapter.bin").read_bytes(),
                                        zip_header, adapter),
        "Textual Inversion embeddings.pt": ("embeddings.pt", _bytes(lambda b: torch.save(ti, b)), zip_header, read_embeddings),
        "config YAML": ("config.yaml", config, yaml_header, read_config),
        "image PNG": ("image.png", _bytes(lambda b: image.save(b, format="PNG")), png_header, load_rgb),
        "image JPEG": ("image.jpg", _bytes(lambda b: image.save(b, format="JPEG")), jpeg_header, load_rgb),
    }


SUMMARY = {}


@pytest.mark.parametrize("reader", ["base checkpoint .ckpt", "base checkpoint .safetensors", "adapter catversion.safetensors",
                                    "adapter pytorch_adapter.bin", "Textual Inversion embeddings.pt", "config YAML",
                                    "image PNG", "image JPEG"])
def test_mutated_files_load_or_fail_in_one_clean_line(reader, valid, tmp_path):
    name, data, header, read = valid[reader]
    folder = tmp_path / "f"
    folder.mkdir()
    path = folder / name
    path.write_bytes(data)
    read(str(path))  # the unmutated file loads
    if name == "pytorch_adapter.bin":  # the authors' format comes with its config, which stays valid
        (folder / "adapter_config.json").write_text(json.dumps({"config": {"prefix_length": 1, "leave_out": []}}))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counts, slowest, failures = {"loaded": 0, "refused": 0}, 0.0, []
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for i, (kind, mutated) in enumerate(mutations(data, header, seed=zlib.crc32(reader.encode()))):
            path.write_bytes(mutated)
            start = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, TIME_LIMIT)
            try:
                read(str(path))
                counts["loaded"] += 1
            except (ValueError, OSError) as e:
                counts["refused"] += 1
                if "\n" in str(e) or not str(e).strip():
                    failures.append(f"#{i} {kind}: a message of {str(e).count(chr(10)) + 1} lines: {str(e)[:300]!r}")
            except Hang:
                failures.append(f"#{i} {kind}: no answer within {TIME_LIMIT} s")
            except BaseException as e:  # noqa: B036 (MemoryError, RecursionError, KeyError, ...: all tracebacks)
                failures.append(f"#{i} {kind}: {type(e).__name__}: {str(e)[:200]}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            slowest = max(slowest, time.perf_counter() - start)
    finally:
        signal.signal(signal.SIGALRM, previous)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    SUMMARY[reader] = counts
    print(f"\nfuzz {reader}: {N} mutations ({N // 3 + (N % 3 > 0)} flips, {N // 3 + (N % 3 > 1)} truncations, {N // 3} "
          f"header edits): {counts['loaded']} loaded, {counts['refused']} refused in one line, {len(failures)} failures; "
          f"slowest {slowest * 1000:.0f} ms, peak RSS +{grown_mb:.0f} MB")
    assert not failures, "\n".join(failures[:20])
    assert grown_mb < RSS_LIMIT_MB


def test_a_mutated_file_ends_in_one_line_through_the_command_line(valid, tmp_path):
    """A handful through scripts/txt2img.py, in real processes: the first mutation of each adapter format that the
    reader refuses is refused by the command line in one line, exit code 2, no traceback, no image."""
    import subprocess
    import sys

    from .conftest import TINY_INFERENCE

    procs = {}
    for reader in ("adapter catversion.safetensors", "adapter pytorch_adapter.bin", "Textual Inversion embeddings.pt"):
        name, data, header, read = valid[reader]
        folder = tmp_path / reader.replace(" ", "_")
        folder.mkdir()
        path = folder / name
        for kind, mutated in mutations(data, header, seed=1):
            path.write_bytes(mutated)
            try:
                read(str(path))
            except ValueError:
                procs[reader] = subprocess.Popen(
                    [sys.executable, "scripts/txt2img.py", "--ckpt_path", "none", "--config", TINY_INFERENCE, "--H", "64",
                     "--W", "64", "--ddim_steps", "2", "--outdir", str(folder / "out"), "--embedding_path", str(path),
                     "--prompt", "a * circle"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                break
    assert len(procs) == 3
    for reader, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 2, err[-2000:]
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in out + err, err[-2000:]
        assert not (tmp_path / reader.replace(" ", "_") / "out").exists()
