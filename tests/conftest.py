"""Test configuration: float64 references, CPU only, compilations kept on disk."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


def pytest_configure(config):
    """Keeps JAX's compiled programs in pytest's cache folder
    (``.pytest_cache/d/jax-compilation-cache``), so that a rerun loads the
    programs of unchanged code instead of compiling them again: most of the
    suite's time is XLA compilation. The cache is keyed on the program, the
    compiler options and the JAX version, so it never changes a result.
    ``pytest --cache-clear`` starts it afresh; ``-p no:cacheprovider``, a
    ``JAX_COMPILATION_CACHE_DIR`` of your own or
    ``TASKSURROGATE_TEST_COMPILATION_CACHE=0`` leave it out.
    """
    if (os.environ.get("TASKSURROGATE_TEST_COMPILATION_CACHE", "1") == "0"
            or getattr(config, "cache", None) is None
            or jax.config.jax_compilation_cache_dir):
        return
    path = config.cache.mkdir("jax-compilation-cache")
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
