"""What is served: every model folder with its status, task, labels and card metadata."""

from __future__ import annotations

from fastapi import APIRouter

from .. import schemas
from ..openapi_doc import AUTH, ERROR
from .deps import RegistryDep

router = APIRouter(tags=["models"])


@router.get("/models", summary="Every model folder: status, task, card metadata", responses={**AUTH})
async def list_models(registry: RegistryDep) -> schemas.ModelList:
    return schemas.ModelList(models=[schemas.ModelInfo(**d) for d in registry.describe()])


@router.get("/models/{name}", summary="One model: labels, card metadata, eval metrics",
            responses={**AUTH, 404: {**ERROR, "description": "No such model"}})
async def get_model(name: str, registry: RegistryDep) -> schemas.ModelInfo:
    return schemas.ModelInfo(**registry.get(name).describe())
