"""Process setup: ``--nproc N`` re-runs ``ckpt train`` under torchrun, one process per rank.

The launching process validates the config first (so a bad file fails once,
with one message, before any worker starts), then runs torch's elastic launcher
(``torch.distributed.run``, i.e. ``torchrun --standalone --nproc_per_node N -m
ckpt_core.cli.main train ...``) in-process. Workers see torchrun's environment
(``RANK``, ``WORLD_SIZE``, ...) and join a process group: NCCL when training
on CUDA, gloo on CPU. A single process without torchrun joins a one-rank gloo
group over an in-memory store, so the code path is the same on one rank.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger("ckpt_core.trainer")

#: Set by :func:`relaunch` for its workers: the pid of the ``ckpt train --nproc N`` process.
LAUNCHER_ENV = "CKPT_TRAIN_LAUNCHER_PID"
#: Signals torchrun's agent turns into "stop the workers" (its default).
_TORCHRUN_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")


@dataclass(frozen=True)
class Dist:
    """This process's place in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: writes metrics and the console."""
        return self.rank == 0


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting RANK)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def env_rank() -> int:
    """RANK from the environment (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def pick_device(preference: str, local_rank: int) -> torch.device:
    """``job.device`` to a concrete device ('auto': CUDA when available)."""
    from ckpt_core.errors import ConfigError

    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("job.device = 'cuda' but CUDA is not available; use 'cpu' or 'auto'.")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    return torch.device("cpu")


def check_devices(preference: str, nproc: int) -> None:
    """On CUDA each rank needs its own GPU: refuse more ranks than GPUs."""
    from ckpt_core.errors import ConfigError

    if pick_device(preference, 0).type != "cuda":
        return
    gpus = torch.cuda.device_count()
    if nproc > gpus:
        raise ConfigError(
            f"--nproc {nproc} needs {nproc} GPUs but {gpus} are visible (NCCL gives each rank "
            f"its own GPU). Use --nproc {gpus}, or --job.device cpu for gloo on CPU."
        )


def init_distributed(device_preference: str = "auto") -> Dist:
    """Join (or create) the process group and pick this rank's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if under_torchrun():
            device_id = device if backend == "nccl" else None
            dist.init_process_group(backend=backend, device_id=device_id)
        else:
            dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown_distributed() -> None:
    """Leave the process group (idempotent)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def die_with_launcher() -> None:
    """In a worker of ``ckpt train --nproc N``: be killed when the launcher dies (Linux).

    torchrun starts each worker in its own session and stops them only when it can
    run its handlers; a launcher killed with SIGKILL would leave them training, and
    the same command started again would write beside them into the same folders.
    ``PR_SET_PDEATHSIG`` has the kernel SIGKILL this worker when its launcher dies.
    """
    expected = os.environ.get(LAUNCHER_ENV)
    if expected is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) != 0:
        logger.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d)", ctypes.get_errno())
        return
    if str(os.getppid()) != expected:  # the launcher died before the prctl call
        os.kill(os.getpid(), signal.SIGKILL)


def worker_pids() -> list[int]:
    """Pids of this launcher's ranks: children whose environment names this process (Linux)."""
    me = os.getpid()
    marker = f"{LAUNCHER_ENV}={me}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            if ppid != me:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    pids.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return pids


def forward_signals(signals: Sequence[signal.Signals]) -> str:
    """In the launcher: pass each of ``signals`` on to the ranks instead of dying.

    torchrun would forward them too, but SIGKILLs ranks that take over 30 s (a
    preemption save may take longer) and loses their exit status; so torchrun is
    told to leave these signals alone and the launcher returns the ranks' own status
    (75 after a preemption save). A signal that arrives before any rank started ends
    the launcher the default way. Returns torchrun's ``--signals-to-handle`` value.
    """
    handled = [n for n in _TORCHRUN_SIGNALS if n not in {s.name for s in signals}]
    if not signals or not sys.platform.startswith("linux"):
        return ",".join(_TORCHRUN_SIGNALS)

    def forward(signum: int, frame: object) -> None:
        pids = worker_pids()
        if not pids:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in signals:
        signal.signal(sig, forward)
    return ",".join(handled)


def relaunch(
    nproc: int,
    argv: Sequence[str],
    *,
    verbose: bool = False,
    forward: Sequence[signal.Signals] = (),
) -> int:
    """Run ``ckpt train argv`` on ``nproc`` local ranks under torchrun; the exit code.

    ``argv`` must not contain ``--nproc``. The workers print their own errors;
    torchrun's summary of a failed worker is kept to one line. ``forward``: the
    preemption signals passed on to the ranks (:func:`forward_signals`).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    module_args = ["-v"] if verbose else []
    torchrun_signals = forward_signals(forward)
    torchrun_args = parse_args(
        [
            "--standalone",
            f"--signals-to-handle={torchrun_signals}",
            f"--nproc_per_node={nproc}",
            "--module",
            "ckpt_core.cli.main",
            *module_args,
            "train",
            *argv,
        ]
    )
    # One thread per rank's share of the cores (torchrun would warn and pick 1).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ[LAUNCHER_ENV] = str(os.getpid())  # workers die with this process
    # torchrun's agent logs restarts and failures with long tracebacks: keep errors only.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    logger.info("launching %d ranks with torchrun", nproc)
    try:
        run(torchrun_args)
    except ChildFailedError as exc:
        codes = sorted(
            ((rank, failure.exitcode) for rank, failure in exc.failures.items()),
            key=lambda rc: rc[0],
        )
        # A rank that exited on its own (e.g. 2 for a refused folder) speaks for the run:
        # torchrun SIGTERMs the other ranks as soon as one fails, so a lower rank may
        # show that signal although it was about to exit with the same code.
        own = [rc for rc in codes if rc[1] > 0]
        rank, code = (own or codes or [(0, 1)])[0]
        if code < 0:
            print(f"ckpt train: rank {rank} was killed by signal {-code}", file=sys.stderr)
            return 128 - code
        return code or 1
    return 0
