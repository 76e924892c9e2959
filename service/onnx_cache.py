"""Where a model folder's exported ONNX files live: a cache outside the model folders.

Model folders may be mounted read-only, and a folder is the contract between training and serving
(docs: DESIGN.md), so nothing is written into them. Each folder version gets one cache entry,
`<onnx_cache>/<folder name>-<key>/`, whose key hashes what the exported graph depends on: the
*contents* of the folder's config and weight files (and of an adapter's base folder), the task,
the export format and the library versions. Content, not mtimes: a folder copied into a new
container (fresh mtimes) keeps its cache entry, and a rewritten one with the same sizes and
mtimes does not. Hashing costs one read of the weights (about 0.1 s per 100 MB), at load only.

Files are written beside their final name and renamed into place (`atomic_file`), so a reader
never sees half a file, and two servers exporting the same folder at once both end with a whole one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

# What the graph depends on; the tokenizer and the model card do not change it.
GRAPH_FILES = ("config.json", "adapter_config.json")
GRAPH_SUFFIXES = (".safetensors", ".bin")
# Bump when the export code changes what it writes: old entries are then never read again.
EXPORT_FORMAT = 1


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_digests(path: Path) -> dict[str, str]:
    """sha256 of each file of the folder that the exported graph depends on."""
    return {p.name: _file_digest(p) for p in sorted(path.iterdir())
            if p.is_file() and (p.name in GRAPH_FILES or p.suffix in GRAPH_SUFFIXES)}


def library_versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def cache_key(path: Path, task: str, base: Path | None = None) -> tuple[str, dict]:
    """(hex key, what it was computed from) for the folder `path` (and an adapter's `base` folder)."""
    source = {"format": EXPORT_FORMAT, "task": task, "files": folder_digests(path),
              "base_files": folder_digests(base) if base is not None else None, "versions": library_versions()}
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:20], source


def entry_dir(cache: Path, name: str, key: str) -> Path:
    return cache.expanduser() / f"{name}-{key}"


@contextlib.contextmanager
def atomic_file(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` to write to; renamed onto `target` when the block succeeds,
    removed when it fails."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def writable(folder: Path) -> bool:
    """Whether files can be created in `folder` (created if missing)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False
