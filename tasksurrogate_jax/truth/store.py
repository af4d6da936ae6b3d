"""Results on disk: ``.npz`` chunks plus a JSON manifest; resumable; no pickle.

A :class:`ChunkStore` is one folder holding the results of one configuration:

- ``manifest.json``: ``{"format": ..., "config": {...}, "config_hash": ...}``,
  where ``config`` is any JSON-serialisable description of the run and
  ``config_hash`` the SHA-256 of its canonical JSON (sorted keys);
- ``chunk_00000.npz``, ``chunk_00001.npz``, ...: one file per finished chunk,
  plain arrays only (read back with ``allow_pickle=False``).

Every file is written to a temporary name in the same folder, flushed, fsynced
and renamed (``os.replace``, atomic on POSIX), so a process killed at any
moment leaves either a complete chunk or none. Opening a folder whose
manifest holds a different configuration raises instead of mixing results;
opening it deletes the temporary files a killed writer left behind. One writer
per folder at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from tasksurrogate_jax.truth.fingerprint import array_digest  # noqa: F401 (re-export)

STORE_FORMAT = "tasksurrogate_jax.chunks/1"
MANIFEST = "manifest.json"


def _canonical_json(config: Mapping) -> str:
    try:
        return json.dumps(
            config, sort_keys=True, separators=(",", ":"), allow_nan=False
        )
    except (TypeError, ValueError) as err:
        raise TypeError(
            "config must be JSON-serialisable (str, int, float, bool, None, lists "
            f"and dicts with str keys, finite floats): {err}"
        ) from err


def config_hash(config: Mapping) -> str:
    """SHA-256 hex digest of the canonical JSON of ``config``."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping, got {type(config).__name__}.")
    return hashlib.sha256(_canonical_json(config).encode()).hexdigest()


def _atomic_write(path: Path, write) -> None:
    """Writes via ``write(file_object)`` to a temp file, then renames it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


class StoreMismatchError(ValueError):
    """A store folder holds results of another configuration."""


class ChunkStore:
    """A folder of ``.npz`` chunks for one configuration.

    Args:
      folder: the output folder (created if missing).
      config: JSON-serialisable description of everything that determines the
        results. A folder already holding a different configuration is refused.

    Raises:
      TypeError: ``config`` is not a JSON-serialisable mapping.
      ValueError: ``folder`` holds a manifest of a different configuration, or
        an unreadable manifest.
    """

    def __init__(self, folder, config: Mapping):
        self.folder = Path(folder)
        self.config = json.loads(_canonical_json(config))
        self.config_hash = config_hash(self.config)
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = self.folder / MANIFEST
        if manifest.exists():
            try:
                stored = json.loads(manifest.read_text())
                stored_hash = stored["config_hash"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f"store folder {str(self.folder)!r} holds an unreadable "
                    f"{MANIFEST}; remove it or choose another folder."
                ) from err
            if stored_hash != self.config_hash:
                diff = _config_diff(stored.get("config", {}), self.config)
                raise StoreMismatchError(
                    f"store folder {str(self.folder)!r} holds results of a different "
                    f"configuration (hash {stored_hash[:12]}, expected "
                    f"{self.config_hash[:12]}; differing keys: {diff}). Refusing to "
                    "mix results: use another folder, or delete this one to start "
                    "over."
                )
        else:
            payload = {
                "format": STORE_FORMAT,
                "config": self.config,
                "config_hash": self.config_hash,
            }
            text = json.dumps(payload, indent=2, sort_keys=True).encode()
            _atomic_write(manifest, lambda f: f.write(text))
        # Temporary files of a writer killed before its rename: never results.
        for stale in self.folder.glob(".chunk_*.tmp"):
            stale.unlink(missing_ok=True)

    def chunk_path(self, index: int) -> Path:
        return self.folder / f"chunk_{int(index):05d}.npz"

    def has_chunk(self, index: int) -> bool:
        return self.chunk_path(index).exists()

    def finished_chunks(self) -> list[int]:
        """Indices of the chunks on disk, sorted."""
        out = []
        for p in self.folder.glob("chunk_*.npz"):
            try:
                out.append(int(p.stem.split("_")[1]))
            except ValueError:
                continue
        return sorted(out)

    def save_chunk(self, index: int, arrays: Mapping[str, np.ndarray]) -> None:
        """Writes one chunk atomically (arrays are converted to NumPy)."""
        arrays = {str(k): np.asarray(v) for k, v in arrays.items()}
        for k, v in arrays.items():
            if v.dtype == object:
                raise TypeError(f"chunk array {k!r} has dtype object; not storable.")
        _atomic_write(self.chunk_path(index), lambda f: np.savez(f, **arrays))

    def load_chunk(self, index: int) -> dict[str, np.ndarray]:
        """Reads one chunk back (no pickle)."""
        with np.load(self.chunk_path(index), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def _config_diff(a: Mapping, b: Mapping, prefix: str = "") -> list[str]:
    """Dotted names of the keys whose values differ (into nested mappings)."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k, "<missing>"), b.get(k, "<missing>")
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            out += _config_diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}")
    return out[:10]
