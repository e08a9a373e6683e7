"""docs/scaling.md holds the tables that ray_jobs.scaling_plan computes from its inputs, and the
plan's arithmetic keeps the properties the page's reading of it relies on."""

import pathlib

import pytest

from ray_jobs import scaling_plan

SCALING_DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "scaling.md"


def test_the_scaling_page_holds_the_tables_the_plan_prints():
    text = SCALING_DOC.read_text()
    begin, end = "<!-- scaling_plan:begin -->", "<!-- scaling_plan:end -->"
    printed = text[text.index(begin) + len(begin):text.index(end)].strip()
    assert printed == scaling_plan.markdown(), "docs/scaling.md is stale: paste `python -m ray_jobs.scaling_plan`"


def test_the_plan_keeps_each_presets_batch_and_horizon_on_every_node_count():
    rows = scaling_plan.plan()
    for preset in scaling_plan.PRESETS:
        mine = [r for r in rows if r["preset"] == preset]
        assert len({(r["batch"], r["steps"], r["tokens"]) for r in mine}) == 1
        for r in mine:  # the batch is exactly rows x T x workers x accumulation
            assert r["device_batch"] * scaling_plan.SEQUENCE_LEN * 8 * r["nodes"] * r["grad_accum"] == r["batch"]


def test_compute_halves_with_twice_the_nodes_and_communication_grows_across_nodes():
    rows = {(r["preset"], r["nodes"]): r for r in scaling_plan.plan()}
    for preset in scaling_plan.PRESETS:
        assert rows[(preset, 2)]["compute_s"] * 2 == pytest.approx(rows[(preset, 1)]["compute_s"])
        assert rows[(preset, 2)]["communication_s"] > 5 * rows[(preset, 1)]["communication_s"]
        assert rows[(preset, 1)]["scaling"] == 1.0 > rows[(preset, 2)]["scaling"] > rows[(preset, 4)]["scaling"]


def test_the_plans_mfu_reproduces_the_published_d26_throughput():
    size = scaling_plan.model_size(26)
    tokens_per_second = (scaling_plan.reference_mfu() * scaling_plan.H100_BF16_PEAK * scaling_plan.GPUS_PER_NODE
                         / size.flops_per_token)
    assert abs(tokens_per_second - scaling_plan.REFERENCE_D26_TOKENS_PER_SECOND) < 1
    assert round(size.params / 1e6, 1) == 1681.8 and round(scaling_plan.model_size(20).params / 1e6, 1) == 896.5
