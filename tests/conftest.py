"""Shared pytest configuration."""

import os
import tempfile

import pytest

# NOTE: mesa's plans are cached with AOTAutograd's cache under Inductor's cache dir, keyed on the pass's sources and
# config (actpass/cache.py). A test that monkeypatches planner internals changes neither, so a developer's cache (or an
# earlier test of the same session) could hand a later test a plan made under the patch. Each session gets its own dir;
# tests that patch the planner also turn the cache off (the no_plan_cache fixture below).
# The workers of one `pytest -n N` run share the dir (xdist gives them one run id): a graph or kernel that tests in
# different files compile alike is compiled once per run, not once per worker.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _RUN:
    _DIR = os.path.join(tempfile.gettempdir(), f"actpass-tests-inductor-{_RUN}")
    os.makedirs(_DIR, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _DIR
else:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="actpass-tests-inductor-")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~30 s (e.g. compiling the CUDA sources with nvcc)")


@pytest.fixture
def no_plan_cache():
    """AOTAutograd's cache (and with it mesa's plan cache) off for one test.

    Uses the config module's own ``patch``, not ``monkeypatch.setattr``: since pytest 9.2, ``monkeypatch``'s undo
    deletes an attribute that was not in the target's instance ``__dict__``, and torch's config modules serve their
    entries through ``__getattr__``, so the undo removed ``enable_autograd_cache`` for the rest of the session (every
    later compile then failed with "torch._functorch.config.enable_autograd_cache does not exist").
    """
    import torch._functorch.config

    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield
