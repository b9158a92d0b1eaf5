"""Benchmark sweeps: the grid, the serial backend, and Ray (a local 2-CPU Ray instance) == serial."""

from __future__ import annotations

import json
import sys

import pytest

from diffspeed.errors import DiffspeedError
from diffspeed.methods import StepCacheConfig
from diffspeed.recipe import Recipe
from diffspeed.sweep import ROW_FIELDS, TIMING_FIELDS, build_tasks, run_sweep

FAST = Recipe((StepCacheConfig(threshold=0.5, warmup_steps=1, final_steps=0),), name="fast")
# 3 steps, 1 timed repeat, no warmup: the tiny models take milliseconds per generation
OPTS = dict(steps=3, warmup=0, repeats=1, with_judge=False, torch_threads=1, progress=False)


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def test_grid_order_and_granularity():
    tasks = build_tasks(["tiny-dit", "tiny-flux"], [FAST], [0, [1, 2]])
    assert [(t.model, t.seeds) for t in tasks] == [("tiny-dit", (0,)), ("tiny-dit", (1, 2)),
                                                  ("tiny-flux", (0,)), ("tiny-flux", (1, 2))]
    assert all(len(t.recipes) == 2 and t.keep == (0, 1) for t in tasks)  # full model first, always
    named = build_tasks(["tiny-dit"], [FAST, Recipe(name="base")], [0])[0]
    assert [Recipe.from_json(t).label for t in named.recipes] == ["base", "fast"]  # as run_bench orders them
    cells = build_tasks(["tiny-dit"], [Recipe(), FAST], [0], group_by="cell")
    assert [t.keep for t in cells] == [(0,), (1,)] and len(cells[1].recipes) == 2  # own baseline


@pytest.mark.parametrize("kwargs, match", [
    (dict(models=[], recipes=[], seeds=[0]), "non-empty list of model names"),
    (dict(models=["tiny-dit"], recipes=[], seeds=[]), "at least one seed"),
    (dict(models=["tiny-dit"], recipes=[], seeds=[[0, "x"]]), "int or a non-empty list"),
    (dict(models=["tiny-dit"], recipes=["{not json"], seeds=[0]), "not valid JSON"),
    (dict(models=[object()], recipes=[], seeds=[0]), "each task loads itself"),
    (dict(models=["tiny-dit"], recipes=[], seeds=[0], backend="dask"), "'ray' or 'local'"),
    (dict(models=["tiny-dit"], recipes=[], seeds=[0], group_by="x"), "group_by"),
    (dict(models=["tiny-dit"], recipes=[], seeds=[0], backend="local", address="auto"), "Ray options"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(DiffspeedError, match=match):
        run_sweep(**kwargs, progress=False)


def test_ray_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(DiffspeedError, match=r"pip install 'ray"):
        run_sweep(["tiny-dit"], [], [0], backend="ray", progress=False)


def test_local_rows_match_run_bench_and_failures_become_error_rows(tmp_path):
    import torch

    from diffspeed.bench.runner import run_bench, write_json
    from diffspeed.models.loading import load_model

    rows = run_sweep(["tiny-dit", "no-such-model"], [FAST], [[0, 1]], backend="local", **OPTS)
    assert [(r["model"], r["recipe"]) for r in rows] == [("tiny-dit", "full"), ("tiny-dit", "fast"),
                                                         ("no-such-model", "full"), ("no-such-model", "fast")]
    assert all(set(r) == set(ROW_FIELDS) for r in rows)
    good, bad = rows[:2], rows[2:]
    assert all(r["error"] is None for r in good) and good[1]["stats"]["step_cache"]
    assert all("unknown model" in r["error"] and r["latency_ms"] is None for r in bad)
    # the same rows as one run_bench call (+ "seeds"), timing aside
    torch.set_num_threads(1)
    ref = run_bench(load_model("tiny-dit"), [Recipe(), FAST], seeds=[0, 1], num_steps=3, warmup=0, repeats=1,
                    with_judge=False, progress=False)
    expect = [{**r, "seeds": [0, 1]} for r in ref]
    assert _without_timing(good) == json.loads(json.dumps(_without_timing(expect)))
    write_json(rows, tmp_path / "sweep.json")  # JSON-safe


def test_ray_equals_local():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install ray): the Ray backend is not tested")
    models, seeds = ["tiny-dit", "tiny-flux"], [0, [1, 2]]
    local = run_sweep(models, [FAST], seeds, backend="local", **OPTS)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        by_pair = run_sweep(models, [FAST], seeds, backend="ray", **OPTS)  # uses the running Ray
    finally:
        ray.shutdown()
    # no Ray running: run_sweep starts a local one and shuts it down
    by_cell = run_sweep(models, [FAST], seeds, backend="ray", group_by="cell", ray_init_kwargs={"num_cpus": 2}, **OPTS)
    assert not ray.is_initialized()
    assert len(local) == 8 and all(r["error"] is None for r in local), [r["error"] for r in local]
    assert _without_timing(by_pair) == _without_timing(local)
    assert _without_timing(by_cell) == _without_timing(local)
    assert all(r["latency_ms"] > 0 for r in by_pair + by_cell)
