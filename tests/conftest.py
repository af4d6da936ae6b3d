"""Test configuration: float32 by default, float64 where a test says so, CPU
only, compilations kept on disk.

**Precision.** The suite runs with 64-bit JAX *off*, as users run it on GPUs
and TPUs: arrays are float32 unless a test asks otherwise. A test that
genuinely needs float64 (a float64 NumPy/SciPy/scikit-learn reference at a
tight tolerance, an ill-conditioned solve, a ``precision="float64"`` workload,
a float32-against-float64 comparison) carries ``@pytest.mark.float64`` (on
the test, its class or ``pytestmark`` of its module): the autouse fixture
``_x64_per_test`` turns 64-bit JAX on for that test only and restores the
previous value afterwards, whatever the test did (the CLI turns it on itself
for ``precision=float64``). JAX keys its compiled-program caches (in memory
and on disk) on ``jax_enable_x64``, so a program traced in a float64 test is
never reused by a float32 one. Module- or session-scoped fixtures are set up
outside the test's fixture: they see 64-bit JAX off (build float64 inputs
inside ``with jax.enable_x64(True):`` or in the test).
``TASKSURROGATE_TEST_X64=1`` runs the whole suite with 64-bit JAX on (the
previous default, for comparisons).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

ALL_X64 = os.environ.get("TASKSURROGATE_TEST_X64", "0") == "1"
jax.config.update("jax_enable_x64", ALL_X64)


@pytest.fixture(autouse=True)
def _x64_per_test(request):
    """64-bit JAX for tests marked ``float64`` (all tests when
    ``TASKSURROGATE_TEST_X64=1``), off otherwise; the global value is restored
    after the test."""
    wanted = ALL_X64 or request.node.get_closest_marker("float64") is not None
    jax.config.update("jax_enable_x64", wanted)
    try:
        yield wanted
    finally:
        jax.config.update("jax_enable_x64", ALL_X64)


def pytest_configure(config):
    """Keeps JAX's compiled programs in pytest's cache folder
    (``.pytest_cache/d/jax-compilation-cache``), so that a rerun loads the
    programs of unchanged code instead of compiling them again: most of the
    suite's time is XLA compilation. The cache is keyed on the program, the
    compiler options (64-bit JAX included) and the JAX version, so it never
    changes a result. ``pytest --cache-clear`` starts it afresh;
    ``-p no:cacheprovider``, a ``JAX_COMPILATION_CACHE_DIR`` of your own or
    ``TASKSURROGATE_TEST_COMPILATION_CACHE=0`` leave it out.
    """
    if (os.environ.get("TASKSURROGATE_TEST_COMPILATION_CACHE", "1") == "0"
            or getattr(config, "cache", None) is None
            or jax.config.jax_compilation_cache_dir):
        return
    path = config.cache.mkdir("jax-compilation-cache")
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
