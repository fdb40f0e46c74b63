"""Model zoo: one module per family, registered by name (importing this package registers them all)."""

from __future__ import annotations

from lrdeploy.models.lenet import LeNet5  # importing the family module registers its builders
from lrdeploy.models.registry import ModelSpec, create_model, get_spec, list_models, register_model

__all__ = ["LeNet5", "ModelSpec", "create_model", "get_spec", "list_models", "register_model"]
