"""Processes of one job (torchrun) and the device each uses: generic, for indexing and training alike.

torch.distributed is only initialised when torchrun says so (WORLD_SIZE > 1), so a plain run never
opens a socket. torch is imported inside the functions: `core` stays light to import.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from model_backend.core.errors import InputError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """'auto' (CUDA when present), 'cpu' or 'cuda[:N]'; a CUDA request without a GPU is the user's error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("CUDA was requested but no GPU is available; use --device cpu.")
    return torch.device(device)


@dataclass(frozen=True)
class Shard:
    """This process's share of a job: chunk c is ours when c % world == rank."""

    rank: int = 0
    world: int = 1

    def owns(self, chunk: int) -> bool:
        return chunk % self.world == self.rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
"""What torchrun sets for every process it starts; a job counts as distributed only when all are there."""
CONNECT_TIMEOUT_S = 60.0
"""How long a rank other than 0 tries to reach rank 0 before saying so ($CDIKT_DIST_CONNECT_S)."""


def env_world_size() -> int:
    """Processes in this job: WORLD_SIZE when torchrun started us (all its variables set), else 1.

    A stray WORLD_SIZE=2 left in a shell (or set for another tool) must not turn a plain `index`
    into a distributed job that crashes or waits for peers that never come.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1
    missing = [v for v in LAUNCH_VARIABLES if not os.environ.get(v)]
    if world > 1 and missing:
        log.warning("WORLD_SIZE=%d is set but %s %s not: not started by torchrun, running as one process",
                    world, ", ".join(missing), "is" if len(missing) == 1 else "are")
        return 1
    return max(world, 1)


def _rendezvous_store(world: int) -> Any:
    """The TCP store of a job whose processes were started by hand (RANK, MASTER_ADDR... set by the user):
    rank 0 hosts it and waits CONNECT_TIMEOUT_S for the others, which must reach it as long; either side
    gives up with one line instead of waiting for the job's whole timeout."""
    import torch.distributed as dist

    check_rendezvous()
    rank = int(os.environ["RANK"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    limit = float(os.environ.get("CDIKT_DIST_CONNECT_S", CONNECT_TIMEOUT_S))
    try:
        store = dist.TCPStore(host, port, world, rank == 0, timedelta(seconds=limit), wait_for_workers=True)
    except (RuntimeError, OSError) as exc:  # DistStoreError is a RuntimeError
        what = "No other process joined" if rank == 0 else "Cannot join"
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]
        raise InputError(f"{what} rank 0 at {host}:{port} within {limit:.0f} s ({detail}); start all "
                         f"{world} processes, or unset WORLD_SIZE/RANK to run as one.") from None
    return store


def check_rendezvous(timeout_s: float | None = None) -> None:
    """On a rank other than 0, reach rank 0's MASTER_ADDR:MASTER_PORT within the timeout, or say why not
    in one line (joining the process group would otherwise wait silently for half an hour)."""
    import socket

    if int(os.environ.get("RANK", "0")) == 0:
        return
    host, port = os.environ.get("MASTER_ADDR", ""), int(os.environ.get("MASTER_PORT", "0") or 0)
    limit = timeout_s if timeout_s is not None else float(os.environ.get("CDIKT_DIST_CONNECT_S", CONNECT_TIMEOUT_S))
    deadline = time.monotonic() + limit
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, limit)):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise InputError(f"Cannot reach rank 0 at {host}:{port} within {limit:.0f} s ({exc.strerror or exc}); "
                                 "start every process with torchrun, or unset WORLD_SIZE/RANK to run as one.") \
                    from None
            time.sleep(1.0)


def is_distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process, joining the process group when torchrun started us.

    Without torchrun (WORLD_SIZE unset or 1) nothing is initialised and the answer is
    (0, 1, device). Under torchrun each process takes GPU LOCAL_RANK with NCCL when CUDA is
    there (and not refused by device='cpu'), else the CPU with gloo. Calling it twice is harmless.
    """
    import torch
    import torch.distributed as dist

    world = env_world_size()
    if world <= 1 and not is_distributed():  # a group set up by the caller (any init method) still counts
        return 0, 1, resolve_device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if os.environ.get("TORCHELASTIC_RUN_ID"):  # torchrun: its agent hosts the rendezvous and started every rank
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        else:  # started by hand: a missing peer is said within a minute, not after the job's timeout
            dist.init_process_group(backend=backend, store=_rendezvous_store(world), rank=int(os.environ["RANK"]),
                                    world_size=world, timeout=timedelta(seconds=timeout_s))
    rank = dist.get_rank()
    log.info("Rank %d of %d on %s (%s)", rank, dist.get_world_size(), dev, dist.get_backend())
    return rank, dist.get_world_size(), dev


def is_main() -> bool:
    """True on rank 0, and in any process not started by torchrun: where logs, prints and saves belong."""
    if is_distributed():
        import torch.distributed as dist

        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def current_shard() -> Shard:
    if not is_distributed():
        return Shard()
    import torch.distributed as dist

    return Shard(dist.get_rank(), dist.get_world_size())


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def broadcast(value: object, src: int = 0) -> object:
    """`value` as rank `src` has it, on every rank (identity when not distributed)."""
    if not is_distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    """Leave the process group (torchrun expects every rank to exit cleanly)."""
    if is_distributed():
        import torch.distributed as dist

        dist.destroy_process_group()
