"""`make bench` fails when it should: a part that raised, or a floor measured and not met."""

from __future__ import annotations

from model_backend.bench.parts import floors
from model_backend.bench.run import failures


def test_failed_parts_and_unmet_floors_fail_the_run_skipped_ones_do_not() -> None:
    out = {"e2e_vs_model": 0.95, "synth_render_s": 0.1, "query_s_1e5_with_embed": 0.12}
    out["floors"], _ = floors(out)
    assert failures(out) == []  # met, and the rest not measured (skipped parts) is no failure
    out["e2e_vs_model"] = 0.5
    out["training_error"] = "RuntimeError: boom"
    out["floors"], _ = floors(out)
    assert failures(out) == ["part training failed", "floor e2e_vs_model not met (0.5 >= 0.9)"]
