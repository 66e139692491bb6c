"""Several processes on one or more machines: ``torchrun ... -m dfkd_cli compress`` or ``--nproc N``.

Every rank builds the same student and generator (same seed), then synthesizes its own share of
the data (seed + rank). After each backward pass the gradients of the student (and of trained
generators and discriminators) are averaged over the ranks in one all-reduce, which is what
DistributedDataParallel does; dfkd averages them itself because lra's inner gradient
(``torch.autograd.grad`` with ``create_graph``) and ``functional_call`` forwards do not compose
with DDP's reducer. Every decision that must agree across ranks is taken on all-reduced numbers:
the student's loss (so a non-finite loss on one rank rolls back every rank), the held-out
agreement that selects the student, the race's scores, the end of the time budget and stop
requests. The frozen teacher is replicated, never synchronised. Only rank 0 writes files and
shows progress.

Example:
    >>> world = World.from_env()            # RANK, WORLD_SIZE, LOCAL_RANK as torchrun sets them
    >>> world.start(torch.device("cpu"))     # gloo on CPU, NCCL on CUDA
    >>> world.average_gradients(model.parameters())
"""

from __future__ import annotations

import datetime
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from dfkd_cli.errors import DfkdError
from dfkd_cli.runtime import distributed_env

TIMEOUT = datetime.timedelta(minutes=10)  # a rank that stops answering ends the job after this
STOP_GRACE_S = 10.0  # what a rank gets to stop cleanly (SIGTERM) before it is killed
FAILED_JOB_GRACE_S = 2.0  # the same once another rank has failed


@dataclass
class World:
    """This process's place among ``size`` processes (``size`` 1: a plain single-process run)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "World":
        rank, size, local_rank = distributed_env()
        if size > 1 and not 0 <= rank < size:
            raise DfkdError(f"RANK {rank} is outside WORLD_SIZE {size}; launch with torchrun or dfkd compress --nproc N")
        return cls(rank, size, local_rank)

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Each rank's own GPU (by local rank); the CPU stays the CPU."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def start(self, device: torch.device) -> None:
        if not self.active or dist.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend, rank=self.rank, world_size=self.size, timeout=TIMEOUT)
        except (RuntimeError, ValueError) as err:
            raise DfkdError(f"rank {self.rank} could not join the other {self.size - 1} process(es) "
                            f"({str(err).splitlines()[0][:120]}); check MASTER_ADDR/MASTER_PORT or use --nproc N", 3) from None

    def stop(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace every gradient by its mean over the ranks, in one all-reduce."""
        if not self.active:
            return
        _in_one_call([p.grad for p in params if p.grad is not None],
                     lambda flat: (dist.all_reduce(flat), flat.div_(self.size)))

    def share_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's floating-point buffers (BatchNorm running statistics) to every rank, as DDP
        broadcasts them, so the ranks' models stay identical."""
        if not self.active:
            return
        _in_one_call([b for b in model.buffers() if b.is_floating_point()], lambda flat: dist.broadcast(flat, src=0))

    def identical(self, model: torch.nn.Module) -> bool:
        """Whether every rank holds exactly the same weights and buffers (a SHA-256 per rank)."""
        if not self.active:
            return True
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        mine = [float(byte) for byte in digest.digest()]
        return bool(torch.equal(self._reduce(mine, dist.ReduceOp.MIN), self._reduce(mine, dist.ReduceOp.MAX)))

    def mean(self, value: float) -> float:
        """``value``'s mean over the ranks (NaN anywhere gives NaN everywhere)."""
        if not self.active:
            return value
        return float(self._reduce([value])[0]) / self.size

    def maximum(self, values: list[float]) -> list[float]:
        """Each of ``values``' maximum over the ranks."""
        if not self.active:
            return list(values)
        return self._reduce(values, dist.ReduceOp.MAX).tolist()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any rank."""
        if not self.active:
            return flag
        return bool(self._reduce([float(flag)], dist.ReduceOp.MAX)[0] > 0)

    def _reduce(self, values: list[float], op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=op)
        return tensor.cpu()



def _in_one_call(tensors: list[torch.Tensor], collective: Callable[[torch.Tensor], Any]) -> None:
    """Run ``collective`` on ``tensors`` flattened into one buffer (one message instead of one
    per tensor), then copy the result back into them."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    collective(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def launch(nproc: int, args: list[str]) -> int:
    """Run ``dfkd <args>`` as ``nproc`` processes on this machine, with the environment torchrun
    gives them (``torchrun --standalone``). When one fails the others are stopped and its exit
    code is returned; Ctrl-C reaches every process, which stop cleanly on their own."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(nproc),
           "LOCAL_WORLD_SIZE": str(nproc)}
    # Each process gets its share of the cores (torchrun sets 1): N processes with all the cores
    # each would oversubscribe them. A value the user set wins.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    command = [sys.executable, "-m", "dfkd_cli", *args]
    processes: list[subprocess.Popen] = []
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the children get it from the terminal
    # SIGTERM (a scheduler stopping the job) reaches this process only: pass it on, so every
    # process stops cleanly with exit 130 and this one returns that
    previous_term = signal.signal(signal.SIGTERM, lambda *_: [p.terminate() for p in processes])
    processes += [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(nproc)]
    grace = STOP_GRACE_S
    try:
        code = _wait_all(processes)
        # The ranks still running wait in a collective for the one that failed, where a stop
        # request cannot reach them: they have nothing left to save.
        grace = FAILED_JOB_GRACE_S if code else grace
        return code
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
        _stop(processes, grace)


def _wait_all(processes: list[subprocess.Popen]) -> int:
    while True:
        codes = [p.poll() for p in processes]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            return failed[0] if failed[0] > 0 else 128 - failed[0]  # killed by signal N: 128 + N
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


def _stop(processes: list[subprocess.Popen], grace: float) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
