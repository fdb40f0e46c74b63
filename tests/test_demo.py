"""The main job's verdict line and its model choice (the full demo runs in `make demo`, not in the suite)."""

from __future__ import annotations

from lrdeploy.demo import DEMO_MODEL, PROMISE, promise_line


def _report(speedup: float, drop: float) -> dict:
    return {"latency": {"1": {"speedup": 9.0}, "32": {"speedup": speedup}},
            "budget": {"checks": [{"name": "accuracy drop (points)", "limit": 0.5, "value": drop}]}}


def test_promise_is_kept_only_with_both_the_speed_up_and_the_accuracy():
    assert PROMISE == {"speedup_b32": 2.0, "max_accuracy_drop": 0.5}
    kept = promise_line(_report(2.4, 0.3))
    assert "kept" in kept and "2.40×" in kept and "-0.30 points" in kept
    assert "missed" in promise_line(_report(1.9, 0.0))  # batch 32 decides, not batch 1
    assert "missed" in promise_line(_report(3.0, 0.6))
    assert "+0.07 points" in promise_line(_report(3.0, -0.07))  # a gain is shown as one
    assert "missed" in promise_line({"latency": {}, "budget": {}})


def test_the_demo_model_is_one_where_low_rank_can_pay():
    from lrdeploy.methods.selection import select_layers
    from lrdeploy.models import create_model

    model = create_model(DEMO_MODEL)
    chosen, _ = select_layers(model)
    factorisable = sum(model.get_submodule(n).weight.numel() for n in chosen)
    assert factorisable / sum(p.numel() for p in model.parameters()) > 0.95
