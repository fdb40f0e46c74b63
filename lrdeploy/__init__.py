"""lrdeploy: train or load low-rank/sparse networks, fold them for deployment, and prove the gain."""

__version__ = "0.1.0"
