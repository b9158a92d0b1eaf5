"""Helpers of the multi-process tests (test_distributed, test_context_parallel).

Starting processes and importing torch/diffusers is the cost, so every multi-process check of a module
runs in one spawned gloo group on the CPU: each rank's worker runs inside :func:`rank_group`, which
writes the rank's findings to a file, and the parent (:func:`spawn_group`) reads them back to assert.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
import traceback
from typing import Callable, Iterator

import pytest
import torch

from diffspeed.errors import DiffspeedError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expect_error(fn, *args, **kwargs) -> str | None:
    """The DiffspeedError message of fn(...), or None if it did not raise."""
    try:
        fn(*args, **kwargs)
    except DiffspeedError as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def rank_group(rank: int, world: int, port: int, outdir: str) -> Iterator[dict]:
    """One rank of a ``world``-process gloo group on 127.0.0.1:``port``: yields the rank's findings
    (a dict), destroys the group after the block, and saves the findings to ``outdir/rank{rank}.pt``;
    an exception in the block is recorded there as ``fatal`` (a traceback) instead of propagating."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    res: dict = {}
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        yield res
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent
        res["fatal"] = traceback.format_exc()
    torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))


def run_group(worker: Callable, outdir: str, world: int, timeout_s: float) -> str | None:
    """Spawn a ``world``-process group running ``worker(rank, world, port, outdir)``; returns a note if a
    process died (e.g. a gloo abort at teardown)."""
    import torch.multiprocessing as mp

    ctx = mp.spawn(worker, args=(world, free_port(), outdir), nprocs=world, join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-process group did not finish within {timeout_s} s (hang?)")
    except mp.ProcessExitedException as exc:  # judged below by what the ranks wrote
        return str(exc)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return None


def spawn_group(worker: Callable, make_outdir: Callable[[int], str], world: int, timeout_s: float) -> list[dict]:
    """Run the group (:func:`run_group`) and return every rank's findings, failing on a rank's ``fatal``.

    A rank can die by a signal after writing its results (a gloo thread aborting at interpreter exit,
    seen once on a loaded 2-core machine) or before starting (a port taken between probe and bind):
    the first is harmless, the second is retried once with a fresh port (``make_outdir(attempt)``).
    """
    note = None
    for attempt in range(2):
        outdir = make_outdir(attempt)
        note = run_group(worker, outdir, world, timeout_s)
        if all(os.path.exists(os.path.join(outdir, f"rank{r}.pt")) for r in range(world)):
            break
    else:
        pytest.fail(f"the {world}-process group failed twice: {note}")
    results = []
    for r in range(world):
        res = torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
        assert "fatal" not in res, f"rank {r} failed:\n{res['fatal']}"
        results.append(res)
    return results
