"""JAX's persistent compilation cache, for the pipeline and the command line.

Most of a rerun's time is XLA compiling the same programs again. JAX can keep
compiled programs on disk, keyed on the program, the compiler options, the
device and the JAX version, so a cached program is the program a fresh
compilation would give: the cache never changes a result.

:func:`enable_compilation_cache` turns it on in
``$XDG_CACHE_HOME/tasksurrogate_jax/jax-compilation`` (``~/.cache/...`` when
``XDG_CACHE_HOME`` is unset), unless a cache folder is already configured
(``JAX_COMPILATION_CACHE_DIR`` or ``jax.config``), or
``TASKSURROGATE_COMPILATION_CACHE=0`` opts out. ``run_pipeline`` and
``tasksurrogate run`` call it.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

OPT_OUT = "TASKSURROGATE_COMPILATION_CACHE"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/tasksurrogate_jax/jax-compilation`` (or ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tasksurrogate_jax" / "jax-compilation"


def enable_compilation_cache(folder=None) -> Path | None:
    """Keeps compiled programs in ``folder`` (default :func:`default_cache_dir`).

    Returns:
      The cache folder in use (a folder configured before is kept), or
      ``None`` when ``TASKSURROGATE_COMPILATION_CACHE=0``.
    """
    if os.environ.get(OPT_OUT, "1") == "0":
        return None
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return Path(configured)
    folder = Path(folder) if folder is not None else default_cache_dir()
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Every program: a rerun compiles many small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder


__all__ = ["OPT_OUT", "default_cache_dir", "enable_compilation_cache"]
