"""Test-wide settings: 8 simulated CPU devices and strict numpy semantics.

XLA_FLAGS must be set before jax initialises its backends, so it is set here, at import time of
the first conftest, and a session-start check fails (not skips) when the devices are missing.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_sessionstart(session):
    n = jax.device_count()
    if n != 8:
        raise RuntimeError(
            f"tests need 8 simulated CPU devices, found {n}: XLA_FLAGS was overridden"
        )
