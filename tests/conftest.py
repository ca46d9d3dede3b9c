"""Shared pytest configuration."""

import os
import tempfile

# NOTE: mesa's plans are cached with AOTAutograd's cache under Inductor's cache dir, keyed on the pass's sources and
# config (actpass/cache.py). A test that monkeypatches planner internals changes neither, so a developer's cache (or an
# earlier test of the same session) could hand a later test a plan made under the patch. Each session gets its own dir;
# tests that patch the planner also turn the cache off (see _no_plan_cache in test_planner.py).
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="actpass-tests-inductor-")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~30 s (e.g. compiling the CUDA sources with nvcc)")
