"""Two-process DistributedDataParallel runs for tests that cannot hang: a file rendezvous (no
port to race for), loopback gloo, a deadline on the rendezvous and the join, and no teardown.

A rank that has done its work leaves with os._exit: destroying a gloo process group while a DDP
reducer is still alive can deadlock (the group's destructor waits on its run-loop thread, which
waits for the GIL the destructor holds), and that hung CI.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEADLINE_S = 180


def _rank_main(rank: int, worker: Callable[[int, int, str], None], world: int, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    code = 1
    try:
        dist.init_process_group("gloo", init_method=f"file://{Path(out_dir) / 'rendezvous'}",
                                rank=rank, world_size=world, timeout=timedelta(seconds=60))
        worker(rank, world, out_dir)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run(worker: Callable[[int, int, str], None], world: int, out_dir: Path) -> None:
    """Run worker(rank, world, str(out_dir)) in world processes joined in one gloo group; fail,
    not hang, after DEADLINE_S."""
    context = mp.start_processes(_rank_main, args=(worker, world, str(out_dir)), nprocs=world,
                                 join=False, start_method="spawn")
    end = time.monotonic() + DEADLINE_S
    while not context.join(timeout=1):
        if time.monotonic() > end:
            for p in context.processes:
                p.kill()
            raise TimeoutError(f"DDP workers still running after {DEADLINE_S} s")
