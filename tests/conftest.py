"""Session-wide test settings: offline, quiet, deterministic."""

import os

# Never reach for the Hub: every model and data set in the tests is a local folder.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# The fixtures of tests/service and tests/e2e (model folders, live servers) in one plugin.
pytest_plugins = ["tests.service_fixtures"]
