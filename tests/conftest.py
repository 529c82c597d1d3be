"""Test-wide settings: 8 simulated CPU devices, strict numpy semantics, one compilation cache.

XLA_FLAGS must be set before jax initialises its backends, so it is set here, at import time of
the first conftest, and a session-start check fails (not skips) when the devices are missing.

JAX's persistent compilation cache is on for the whole session: the directory is made once, by
the process that imports this file first (the xdist controller, or the only process under
`-n 0`), and travels in the environment (JAX_COMPILATION_CACHE_DIR) to the xdist workers and to
every subprocess a test starts (`train.main` runs), so a tiny model's train step compiled by one
of them is loaded, not compiled, by the others. Multi-process runs (jax.distributed) leave it out
(tests/test_multihost.run_local): only process 0 writes entries, and a process that loads a
step while its peer compiles it waits past gloo's 30 s deadline in the first collective.
Entries are written atomically under a file lock (a size limit turns jax's lock on), so
concurrent readers never see half a file. A test that times compilation takes the
`no_compilation_cache` fixture, which turns the cache off and fails the test if any compile was
served from it anyway. The controller removes the directory at the end.

Files with more slow tests are collected first (see pytest_collection_modifyitems).
"""

import collections
import os
import shutil
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

_OWN_CACHE_DIR = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="qwen35-jax-test-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE_DIR
    # a tiny model's step or decode loop compiles in 0.5-10 s; eager ops (hundreds of distinct
    # slices in checkpointing, < 0.1 s each) are not worth a file each
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    # any size limit turns on jax's file lock around each read and write (without it a reader
    # can see a half-written file); each write then lists the directory, hence few entries
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(20 * 2**30))

import jax  # noqa: E402
import jax.monitoring  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

_CACHE_HITS = [0]


def _count_cache_hits(event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _CACHE_HITS[0] += 1


jax.monitoring.register_event_listener(_count_cache_hits)


def pytest_sessionstart(session):
    n = jax.device_count()
    if n != 8:
        raise RuntimeError(
            f"tests need 8 simulated CPU devices, found {n}: XLA_FLAGS was overridden"
        )


def pytest_collection_modifyitems(session, config, items):
    """Files with the most slow tests first, each file's tests in their order: xdist
    (`--dist loadfile`) hands files out in this order, so the long files start early and the
    short ones fill the end, and the two workers finish together."""
    slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
    first_seen = {path: i for i, path in enumerate(dict.fromkeys(item.path for item in items))}
    items.sort(key=lambda item: (-slow[item.path], first_seen[item.path]))


def pytest_unconfigure(config):
    if _OWN_CACHE_DIR is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)


@pytest.fixture
def no_compilation_cache():
    """Compiles in this test really compile: the persistent cache is off (and checked unused)."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # jax decides once per process whether the cache is used
    hits = _CACHE_HITS[0]
    try:
        yield
        assert _CACHE_HITS[0] == hits, "a compile was served by the persistent cache"
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        compilation_cache.reset_cache()
