"""lrdeploy: train or load low-rank/sparse networks, fold them for deployment, and prove the gain."""

import os as _os

__version__ = "0.1.0"

# ONNX Runtime's telemetry persists a device id under ~/.cache at import time and prints a warning to stderr
# when it cannot (an unwritable HOME); a deployment tool sends nothing home. A user's own setting wins.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
