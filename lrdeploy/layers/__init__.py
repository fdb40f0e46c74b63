"""lrdeploy.layers: factorised modules that know how to fold themselves, and their structure records."""

from __future__ import annotations

from lrdeploy.layers import structure
from lrdeploy.layers.lowrank import FOLD_MODES, LOWRANK_TYPES, LowRankConv2d, LowRankLayer, LowRankLinear
from lrdeploy.layers.lowrank_bn import LowRankConv2dBN  # registers its kind (Cuttlefish's extra BN)
from lrdeploy.layers.maestro import MAESTRO_TYPES, MaestroConv2d, MaestroLinear  # registers its kinds
from lrdeploy.layers.masked import MaskedConv2d, MaskedLinear  # registers its kinds (sparse layers)
from lrdeploy.layers.sparse_ift import ParallelConv2d  # registers the Sparse-IFT block kinds
from lrdeploy.layers.structure import apply as apply_structure
from lrdeploy.layers.structure import describe as describe_structure
from lrdeploy.layers.svd import energy_kept, rank_for_energy, rank_for_ratio, svd_2d

__all__ = [
    "FOLD_MODES",
    "LOWRANK_TYPES",
    "LowRankConv2d",
    "LowRankConv2dBN",
    "LowRankLayer",
    "LowRankLinear",
    "MAESTRO_TYPES",
    "MaestroConv2d",
    "MaestroLinear",
    "MaskedConv2d",
    "MaskedLinear",
    "ParallelConv2d",
    "apply_structure",
    "describe_structure",
    "energy_kept",
    "rank_for_energy",
    "rank_for_ratio",
    "structure",
    "svd_2d",
]
