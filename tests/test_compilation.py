"""The persistent compilation cache of the pipeline and the CLI."""

from pathlib import Path

import jax

from tasksurrogate_jax.pipeline import compilation


def test_compilation_cache_opt_out_and_configured_folder(monkeypatch, tmp_path):
    monkeypatch.setenv(compilation.OPT_OUT, "0")
    assert compilation.enable_compilation_cache(tmp_path) is None
    monkeypatch.setenv(compilation.OPT_OUT, "1")
    configured = jax.config.jax_compilation_cache_dir
    if configured:  # a folder set before (the tests' own) is kept
        assert compilation.enable_compilation_cache(tmp_path) == \
            Path(configured)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation.default_cache_dir() == (
        tmp_path / "tasksurrogate_jax" / "jax-compilation")
