"""service/registry.py: scanning, lazy loading, leases, and models that cannot serve."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from service.errors import ModelNotFound, ModelUnavailable
from service.metrics import Metrics
from service.registry import Entry, Registry
from service.settings import Settings


async def use(registry: Registry, name: str) -> None:
    async with registry.lease(name):
        pass

def test_registry_scan_hidden_broken_and_lazy(pristine_models, tmp_path):
    for name in ("topics", "corrupt", "base-bert"):
        shutil.copytree(pristine_models / name, tmp_path / name)
    shutil.copytree(pristine_models / "topics", tmp_path / ".partial")

    async def scenario():
        registry = Registry(Settings(models_dir=tmp_path, preload=False, reload_interval_s=0, _env_file=None), Metrics())
        summary = await registry.scan()
        assert registry.names() == ["base-bert", "corrupt", "topics"]
        assert sorted(summary["failed"]) == ["base-bert", "corrupt"]
        assert registry.get("topics").status == "available"  # lazy: not loaded yet
        async with registry.lease("topics") as entry:  # the first use loads it
            assert entry.status == "ready" and entry.worker is not None and entry.users == 1
        assert entry.users == 0
        await registry.stop()

    asyncio.run(scenario())


def test_loading_and_failed_models_are_503_not_crashes(pristine_models, tmp_path):
    async def scenario():
        registry = Registry(Settings(models_dir=tmp_path, reload_interval_s=0, _env_file=None), Metrics())
        registry.entries["busy"] = Entry("busy", tmp_path / "busy", (), "loading")
        registry.entries["bad"] = Entry("bad", tmp_path / "bad", (), "failed", error="no config.json")
        with pytest.raises(ModelUnavailable) as loading:
            await use(registry, "busy")
        assert loading.value.loading and not registry.ready
        with pytest.raises(ModelUnavailable, match="no config.json") as failed:
            await use(registry, "bad")
        assert not failed.value.loading
        with pytest.raises(ModelNotFound, match="bad, busy"):
            await use(registry, "other")

    asyncio.run(scenario())
