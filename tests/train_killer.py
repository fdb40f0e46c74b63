"""Run ``lrdeploy ARGS`` and SIGKILL this process at a chosen point — a crash injected, not timed.

    python train_killer.py steps=N ARGS...         killed after N optimiser steps (mid-epoch when N is not a
                                                   multiple of the steps per epoch)
    python train_killer.py write=STEP:K ARGS...    killed at the K-th atomic-write step named STEP (e.g.
                                                   ``aside:run.checkpoint``: the old checkpoint set aside, the
                                                   new one not yet in place)

Also a torchrun script: every rank kills itself at the same point, as when a machine dies.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from lrdeploy import atomic


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _after_steps(n: int) -> None:
    count = {"steps": 0}
    for cls in (torch.optim.SGD, torch.optim.AdamW):
        original = cls.step

        def step(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            count["steps"] += 1
            if count["steps"] >= n:
                _die()
            return out

        cls.step = step


def _at_write(name: str, k: int) -> None:
    seen = {"n": 0}

    def hook(step: str) -> None:
        if step == name:
            seen["n"] += 1
            if seen["n"] >= k:
                _die()

    atomic.FAULT_HOOK = hook


def main() -> None:
    how, *args = sys.argv[1:]
    kind, _, value = how.partition("=")
    if kind == "steps":
        _after_steps(int(value))
    elif kind == "write":
        name, _, k = value.rpartition(":")
        _at_write(name, int(k))
    else:
        raise SystemExit(f"unknown kill point {how!r}")
    from lrdeploy.cli import main as cli

    sys.argv = ["lrdeploy", *args]
    cli()


if __name__ == "__main__":
    main()
