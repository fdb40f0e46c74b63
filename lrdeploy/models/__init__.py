"""Model zoo: one module per family, registered by name (importing this package registers them all)."""

from __future__ import annotations

from lrdeploy.models.hf_encoder import SOURCE as _HF_SOURCE  # noqa: F401  (hf:PATH)
from lrdeploy.models.lenet import LeNet5  # importing the family module registers its builders
from lrdeploy.models.mlp import MLP
from lrdeploy.models.registry import InputSpec, ModelSpec, create_model, get_spec, list_models, register_model
from lrdeploy.models.resnet import ResNet
from lrdeploy.models.transformer import Seq2SeqTransformer
from lrdeploy.models.user_module import SOURCE as _USER_MODULE_SOURCE  # noqa: F401  (pkg.mod:factory)
from lrdeploy.models.vgg import VGG

__all__ = [
    "VGG",
    "InputSpec",
    "MLP",
    "LeNet5",
    "ModelSpec",
    "ResNet",
    "Seq2SeqTransformer",
    "create_model",
    "get_spec",
    "list_models",
    "register_model",
]
