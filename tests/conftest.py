"""Session-wide test settings: offline, quiet, deterministic."""

import os

import pytest

# Never reach for the Hub: every model and data set in the tests is a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Under pytest-xdist (`make test`: 2 workers on 2 cores) every worker, and every server or training
# process it starts, computes on one thread: two 2-thread OpenMP teams on 2 cores stall at every
# barrier whose other core is busy (a MiniLM forward went from ~10 ms to seconds that way).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

# The fixtures of tests/service and tests/e2e (model folders, live servers) in one plugin.
pytest_plugins = ["tests.service_fixtures"]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(config, items):
    """Under `--dist loadgroup`, a test that uses a module-scoped fixture (a live server, a trained model)
    runs on the worker that runs the rest of its module, so the fixture is built once; other tests
    spread over the workers one by one. A test's own `xdist_group` mark wins."""
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        info = getattr(item, "_fixtureinfo", None)
        scopes = {defs[-1].scope for defs in info.name2fixturedefs.values() if defs} if info else set()
        if "module" in scopes:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
