"""Multi-process PruneTrain under torchrun (DistributedDataParallel), and the `--nproc-per-node` launcher.

torchrun starts one process per GPU (or several on the CPU) with RANK, LOCAL_RANK and WORLD_SIZE
set; `setup` joins them into a process group, NCCL on GPUs and gloo on the CPU. Without those
variables the world is one process and every helper here is a no-op, so a single-process run
takes the same code path.

Whatever must agree across ranks is decided once, on rank 0, and broadcast: the pruning plan
(from rank 0's channel norms), lambda, the dynamic batch, the run directory and the checkpoint
to resume from. Parameters stay identical because DDP averages the gradients and everything
after it (optimizer step, proximal step, shrink) is deterministic on identical inputs. Only
rank 0 writes files and prints.
"""
from __future__ import annotations

import datetime
import gc
import inspect
import os
import re
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from ptgraph.errors import RankFailure, UserError
from ptgraph.passes import PrunePlan

T = TypeVar("T")
LAUNCHED = "PTGRAPH_LAUNCHED"  # set by `launch`: the launcher reports a failed rank, the ranks stay quiet


def pick_device(name: str, local_rank: int = 0, world: int = 1) -> torch.device:
    """This process's device: what --device names; under torchrun on GPUs, the GPU of LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA, which this machine does not have; use --device cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and world > 1:
        if device.index is not None:
            raise UserError(f"--device {name} names one GPU, but under torchrun each process takes the GPU of "
                            f"its LOCAL_RANK; pass --device cuda or auto")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} has no GPU (this machine has {torch.cuda.device_count()}); "
                            f"lower --nproc-per-node")
        device = torch.device("cuda", local_rank)
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


class ShardSampler(Sampler[int]):
    """Rank r of w takes every w-th index of one permutation seeded by `seed`.

    Why: step k of w ranks with batch b then covers perm[k*w*b:(k+1)*w*b], the very samples a
    single process with batch w*b sees at step k, so runs with any world size see the same
    global batches. Training (drop_last) drops the last n % w samples so every rank takes as many
    steps; evaluation keeps all of them (ranks may differ by one sample).
    """

    def __init__(self, n: int, rank: int, world: int, shuffle: bool, seed: int) -> None:
        self.n, self.rank, self.world, self.shuffle, self.seed = n, rank, world, shuffle, seed

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed))
        return order[:self.n - self.n % self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self._order()[self.rank::self.world].tolist())

    def __len__(self) -> int:
        usable = self.n - self.n % self.world if self.shuffle else self.n
        return len(range(self.rank, usable, self.world))


class _Terminated(Exception):
    """SIGTERM arrived: torchrun ends every process when one of them fails."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


_PEER_WORDS = ("gloo", "nccl", "connection reset by peer", "connection closed by peer", "broken pipe")


def is_peer_failure(e: BaseException) -> bool:
    """Whether an exception comes from a collective whose peer died, stalled or hung up."""
    if isinstance(e, (_Terminated, dist.DistError)):
        return True
    return isinstance(e, RuntimeError) and any(w in str(e).lower() for w in _PEER_WORDS)


def _reason(e: BaseException) -> str:
    """The informative part of a gloo/NCCL message: its first sentence, without the source path."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0].rstrip(".")[:160]


class Dist:
    """This process's place in the run; a world of one when torchrun did not start it."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, device: torch.device | None = None,
                 backend: str | None = None) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.device = device if device is not None else torch.device("cpu")
        self.backend = backend  # None: no process group (a world of one)
        self.checkpoint: Path | None = None  # named in the message when a peer fails
        self._old_sigterm: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.backend is not None

    # -- agreement -----------------------------------------------------------------------------
    def broadcast_object(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (any picklable object)."""
        if not self.active:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_plan(self, plan: PrunePlan | None) -> PrunePlan:
        """Rank 0's plan on every rank, so all shrink alike even where float noise would tip a threshold."""
        if not self.active:
            assert plan is not None
            return plan
        return PrunePlan.from_json(self.broadcast_object(plan.to_json() if self.main else None))

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only (files: a checkpoint to load, the run directory) and give every rank its
        result, or its UserError, so no rank waits forever for one that stopped on bad input."""
        if not self.active:
            return fn()
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except UserError as e:
                error = str(e)
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise UserError(error)
        return result

    def local_first(self, fn: Callable[[], T]) -> T:
        """Run `fn` on each machine's local rank 0 first, then on the others (a data download)."""
        if not self.active:
            return fn()
        result, error = None, None
        if self.local_rank == 0:
            try:
                result = fn()
            except UserError as e:
                error = e
        dist.barrier()
        if error is not None:
            raise error
        return result if self.local_rank == 0 else fn()

    def sum(self, *values: float) -> list[float]:
        """Sums over all ranks (epoch loss, accuracy counts); the values themselves when alone."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) everywhere, before they are used or saved: each rank
        updates its own from its own batches (see `wrap`)."""
        if self.active:
            for b in model.buffers():
                dist.broadcast(b, 0)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the model for the forward and backward; the model itself when alone, also under
        torchrun with one process (there is nothing to average, and DDP's hooks and bucket copies cost
        a launch-bound GPU step about a quarter of its time: docs/BENCHMARKS.md).

        Called again after every shrink: DDP's buckets hold the old shapes. The caller drops the old
        wrapper first; a collection here frees its reducer (a stale one ignores later backwards anyway).
        Buffers are not broadcast at every forward: rank 0's statistics come out the same either way
        (each rank updates from its own batches), and `sync_buffers` hands them to all before they are
        used (evaluation, checkpoint); it also spares torch.compile a graph break per step.
        """
        if not self.active or self.world == 1:
            return model
        gc.collect()
        ddp = nn.parallel.DistributedDataParallel
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else "broadcast_buffers": False}  # newer torch; older has only broadcast_buffers
        return ddp(model, device_ids=[self.device.index] if self.device.type == "cuda" else None, **no_sync)

    # -- failure ---------------------------------------------------------------------------------
    def failure_message(self, e: BaseException) -> str:
        if isinstance(e, _Terminated):
            what = (f"rank {self.rank} of {self.world} was sent SIGTERM (torchrun ends every rank when one fails; "
                    f"its log names it)")
        else:
            who = f"rank {1 - self.rank} of 2" if self.world == 2 else f"a rank of {self.world}"
            what = f"{who} stopped ({_reason(e)})"
        return f"{what}; {resume_hint(self.checkpoint, self.main)}"

    @contextmanager
    def failures(self) -> Iterator[None]:
        """Turn a dead, stalled or terminated peer into one RankFailure naming the checkpoint to resume from."""
        try:
            yield
        except Exception as e:
            if self.active and is_peer_failure(e):
                self.teardown(failed=True)
                raise RankFailure(self.failure_message(e)) from e
            raise

    def finish(self) -> None:
        """Wait until every rank has finished its run, so that none leaves the group while another
        still trains, checkpoints or reports (rank 0 holds the store where it, not torchrun, serves it)."""
        if self.active:
            dist.barrier()

    def teardown(self, failed: bool = False) -> None:
        """Leave the process group (not after a failure on NCCL, whose teardown can wait on the dead peer)."""
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
            self._old_sigterm = None
        if self.active and dist.is_initialized() and not (failed and self.backend == "nccl"):
            dist.destroy_process_group()
        self.backend = None


def current(device: torch.device | None = None) -> Dist:
    """The process group someone else initialised (torchrun with the user's own loop, Lightning's ddp
    strategy) as a Dist, so that the PruneTrain object agrees across ranks as the CLI's loop does; a world
    of one without one. `device`: where `sum` puts its tensor (the model's, for NCCL)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Dist(device=device)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device,
                dist.get_backend())


def resume_hint(checkpoint: Path | None, main: bool = True) -> str:
    """Where to resume from; a rank other than 0 may not see rank 0's disk (another machine)."""
    if checkpoint is not None and checkpoint.exists():
        return f"the last checkpoint is {checkpoint}, resume with --resume {checkpoint.parent}"
    if checkpoint is not None and not main:
        return f"rank 0 keeps the last checkpoint, if any, in {checkpoint}; resume with --resume {checkpoint.parent}"
    return "no checkpoint was written yet (one is written after every epoch); start the run again"


def setup(device: str, timeout_s: float) -> Dist:
    """Join torchrun's process group when torchrun started this process; a world of one otherwise.

    `timeout_s` bounds every collective, so ranks waiting on a dead or stalled peer stop instead of
    hanging (gloo raises; NCCL's watchdog ends the process).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(device=pick_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank, world)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    d = Dist(rank, world, local_rank, dev, backend)
    if threading.current_thread() is threading.main_thread():
        d._old_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    return d


def launch(nproc: int, argv: Sequence[str], run_dir: Path) -> int:
    """`ptgraph prune-train --nproc-per-node N ...`: the same command, N processes under torchrun on this
    machine. Returns 0, or 2 when a rank stopped first on bad input (it printed why); a rank that died
    becomes one RankFailure line naming it and the checkpoint to resume from."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if nproc < 1:
        raise UserError("--nproc-per-node must be 1 or more")
    args = torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "ptgraph", *argv])
    os.environ[LAUNCHED] = "1"
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code == 2:  # bad input: the rank said why
            return 2
        how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
            else f"exit code {code}"
        raise RankFailure(f"rank {rank} of {nproc} stopped ({how}); {resume_hint(run_dir / 'checkpoint.pt')}") from None
    finally:
        os.environ.pop(LAUNCHED, None)
    return 0
