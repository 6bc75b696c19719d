"""``dynamics analyze --executor dask``: analysis units as tasks on a Dask distributed cluster.

:class:`DaskUnits` runs the units :func:`dynamics.analyze.analyze_runs` schedules (one run × one checkpoint, and
the ReLoRA-vs-full cross-run units) as Dask tasks. Each task calls the *same* cached unit function as the local
process pool, with the same arguments, so it writes the same files under ``<out>.cache/`` with the same keys: a
cluster run, a local run, a ``--shard`` run and a re-run all fill (and reuse) one cache, and the final table is
assembled from it by the same code as a one-process analysis. Workers take the cache's lock only around their
own writes (as ``--shard`` processes do); the client holds no lock while they compute.

Where the cluster comes from::

    DaskUnits(scheduler="tcp://host:8786")      # a running `dask scheduler` (and its `dask worker`s)
    DaskUnits(scheduler_file="scheduler.json")  # the file `dask scheduler --scheduler-file` wrote
    DaskUnits(workers=4)                        # neither: a LocalCluster of 4 worker processes, 1 thread each

Workers must import :mod:`dynamics` (the same environment as the client) and see the runs and ``<out>`` at the
same paths (a shared file system); the client passes absolute paths.

Failures, in Dask's terms (checked against ``distributed.scheduler``):

* a unit whose input is bad (``skip``: the project's DynamicsError/TrainerError) comes back as a value, not as
  a task error, so it is never retried; the caller lists or raises it exactly as the local path does;
* a worker that dies (killed, out of memory, its machine lost) is not a task error: the scheduler reschedules
  the units it was running on other workers, and only after one unit was running on more than
  ``allowed-failures`` workers that died (``distributed.scheduler.allowed-failures``, 3 by default; set here for
  a LocalCluster, on the scheduler's own configuration for an existing one) does it give up on that unit,
  which then fails with :class:`ClusterError`;
* any other exception raised by a unit (a bug, or a transient error of a shared file system) is retried
  ``retries`` times (``Client.submit(retries=...)``, which covers exceptions raised *inside* a task only),
  then surfaces like on the local path.

Why Dask distributed rather than Ray: it installs from ordinary wheels (``dask``, ``distributed`` and about 15
small dependencies, ~40 MB, nearly all pure Python; the few compiled ones, psutil, msgpack, pyyaml, tornado and
markupsafe, are common packages with wheels for every platform), against Ray's single large binary wheel with its
own object store and dashboard; a LocalCluster starts in-process in about a second, so the tests run a real
cluster; it reaches HPC schedulers through ``dask-jobqueue`` (SLURM, PBS, SGE, LSF, HTCondor) and Kubernetes
through ``dask-kubernetes``; and a unit here is a coarse task (seconds to a minute) that writes its result to a
shared file system and returns nothing, so an object store would carry nothing.
"""

from __future__ import annotations

import json
import os
import time
import uuid
import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from dynamics.validation import DynamicsError

__all__ = [
    "ALLOWED_FAILURES",
    "CONNECT_TIMEOUT_S",
    "EXTRA",
    "RETRIES",
    "STALL_ENV",
    "ClusterError",
    "DaskUnits",
    "require_dask",
]

#: How to install the engine (the ``cluster`` extra).
EXTRA = "pip install relora-dynamics[cluster]"
#: Seconds to wait for an existing scheduler before giving up with one line.
CONNECT_TIMEOUT_S = 10.0
#: Re-runs of a unit that raised something other than an input error (``Client.submit(retries=...)``).
RETRIES = 1
#: Worker deaths one unit may be involved in before it fails (a LocalCluster's ``allowed-failures``).
ALLOWED_FAILURES = 3
#: Test-only: ``{"unit": "LABEL:STEP", "marker": PATH, "seconds": S}`` (JSON) makes the first attempt at that unit
#: write its worker's pid to ``marker`` and sleep ``S`` s before computing, so a test can kill it mid-unit;
#: ``{"unit": "LABEL:STEP", "die": true}`` makes every attempt end its worker process (a unit that kills workers).
STALL_ENV = "DYNAMICS_CLUSTER_TEST_STALL"

U = TypeVar("U", bound=Hashable)


class ClusterError(DynamicsError):
    """The cluster cannot be used (dask missing, scheduler unreachable) or lost a unit (its workers kept dying)."""


def require_dask() -> None:
    """Import dask distributed, or raise :class:`ClusterError` naming the extra that installs it."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise ClusterError(f"--executor dask needs dask distributed, which is not installed: {EXTRA}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def unit_name(unit: Hashable) -> str:
    """``("full", 40)`` → ``"full:40"`` (a task's readable name; :data:`STALL_ENV` matches it)."""
    return ":".join(map(str, unit)) if isinstance(unit, tuple) else str(unit)


def _stall_for_test(name: str) -> None:
    """The :data:`STALL_ENV` hook: a stall on the first attempt at unit ``name`` only (the marker file does not
    exist yet), or the worker's end on every attempt."""
    spec = os.environ.get(STALL_ENV)
    if not spec:
        return
    cfg = json.loads(spec)
    if cfg.get("unit") != name:
        return
    if cfg.get("die"):
        os._exit(1)
    try:
        fd = os.open(cfg["marker"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:  # a later attempt (the first one's worker was killed): compute
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(float(cfg.get("seconds", 60)))


def run_task(
    name: str, fn: Callable[..., Any], args: tuple[Any, ...], skip: tuple[type[BaseException], ...]
) -> BaseException | None:
    """The task a worker runs: ``fn(*args)`` (a unit that writes its rows into the cache).

    Returns ``None``, or the exception when it is one of ``skip`` (a bad input: returned, so Dask does not
    retry it); anything else propagates and Dask retries it (``retries``).
    """
    _stall_for_test(name)
    try:
        fn(*args)
    except skip as e:
        return e
    return None


def _check_address(address: str) -> None:
    """:class:`ClusterError` unless ``address`` names a host with a scheme Dask knows (``tcp://host:8786``)."""
    from distributed.comm import parse_address
    from distributed.comm.registry import get_backend

    try:
        scheme, location = parse_address(address)
        get_backend(scheme)
    except ValueError as e:
        raise ClusterError(f"--scheduler {address!r} is not a scheduler address ({e}); e.g. tcp://host:8786") from None
    if not location:
        raise ClusterError(f"--scheduler {address!r} names no host; e.g. tcp://host:8786")


class DaskUnits:
    """Runs analysis units on a Dask cluster; a context manager (the connection, or the LocalCluster it started).

    ``scheduler``: a scheduler's address (``tcp://host:8786``); ``scheduler_file``: the JSON file a scheduler
    wrote (``dask scheduler --scheduler-file PATH``); neither: a LocalCluster of ``workers`` processes with one
    thread each, started when the first units are submitted (not at all when every unit is cached). An existing
    scheduler is reached on entering, so a wrong address fails before any work, within ``connect_timeout`` s.
    """

    def __init__(
        self,
        *,
        scheduler: str | None = None,
        scheduler_file: str | Path | None = None,
        workers: int = 1,
        retries: int = RETRIES,
        connect_timeout: float | None = None,
    ) -> None:
        if scheduler is not None and scheduler_file is not None:
            raise ClusterError("give --scheduler or --scheduler-file, not both")
        if workers < 1:
            raise ClusterError(f"workers must be >= 1, got {workers}")
        self.scheduler = scheduler
        self.scheduler_file = None if scheduler_file is None else Path(scheduler_file)
        self.workers = workers
        self.retries = retries
        self.connect_timeout = CONNECT_TIMEOUT_S if connect_timeout is None else connect_timeout
        self.client: Any = None
        self.cluster: Any = None

    def __enter__(self) -> DaskUnits:
        require_dask()
        if self.scheduler is not None or self.scheduler_file is not None:
            self._connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the client, and the LocalCluster when this object started it."""
        client, cluster, self.client, self.cluster = self.client, self.cluster, None, None
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()

    @property
    def where(self) -> str:
        """The scheduler, in words."""
        if self.scheduler_file is not None:
            return f"the scheduler of --scheduler-file {self.scheduler_file}"
        if self.scheduler is not None:
            return f"the scheduler at {self.scheduler}"
        return f"a local cluster of {self.workers} worker processes"

    def _connect(self) -> None:
        from distributed import Client

        if self.scheduler_file is not None and not self.scheduler_file.is_file():
            raise ClusterError(
                f"--scheduler-file {self.scheduler_file} not found; start the scheduler with "
                f"`dask scheduler --scheduler-file {self.scheduler_file}`"
            )
        if self.scheduler is not None:  # a malformed address fails here, before a Client is half built
            _check_address(self.scheduler)
        target: dict[str, Any] = (
            {"scheduler_file": str(self.scheduler_file)}
            if self.scheduler_file is not None
            else {"address": self.scheduler}
        )
        try:
            self.client = Client(**target, timeout=self.connect_timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError, TypeError) as e:  # refused, timed out, a malformed address
            raise ClusterError(
                f"cannot reach {self.where} within {self.connect_timeout:g} s ({_one_line(e)}); "
                "start it with `dask scheduler` (and `dask worker`s), or check the address"
            ) from None
        workers = self.client.scheduler_info().get("workers", {})
        if not workers:
            warnings.warn(f"{self.where} has no workers yet: the units wait for `dask worker`s to join", stacklevel=2)
        elif any(w.get("nthreads", 1) > 1 for w in workers.values()):  # units would share one process's torch threads
            warnings.warn(
                f"{self.where} has workers with several threads; start them with `dask worker --nthreads 1` "
                "(one unit per process; more processes with --nworkers)",
                stacklevel=2,
            )

    def _start_local(self) -> None:
        import dask
        from distributed import Client, LocalCluster

        from dynamics._malloc import child_tunables

        # the worker processes start with one malloc arena (see dynamics._malloc)
        with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}), child_tunables():
            self.cluster = LocalCluster(
                n_workers=self.workers, threads_per_worker=1, processes=True, dashboard_address=":0"
            )
        self.client = Client(self.cluster, set_as_default=False)

    def run(
        self, units: Mapping[U, tuple[Callable[..., Any], tuple[Any, ...]]], skip: tuple[type[BaseException], ...]
    ) -> Iterator[tuple[U, BaseException | None]]:
        """Submit every unit ``{unit: (fn, args)}``; yield ``(unit, None)`` as each finishes, or ``(unit, error)``.

        ``error`` is an exception of ``skip`` raised by the unit, or a :class:`ClusterError` when its workers kept
        dying. Any other exception of a unit (after the retries) is raised here, as on the local path. Units are
        yielded in the order they finish; leaving the loop early cancels those not yet finished.
        """
        if not units:
            return
        from distributed import as_completed
        from distributed.client import FutureCancelledError

        try:
            from distributed import KilledWorker
        except ImportError:  # older releases keep it in the scheduler module
            from distributed.scheduler import KilledWorker

        if self.client is None:
            self._start_local()
        token = uuid.uuid4().hex[:12]
        futures: dict[Any, U] = {}
        for unit, (fn, args) in units.items():
            name = unit_name(unit)
            future = self.client.submit(
                run_task, name, fn, args, skip, key=f"dynamics-analyze-{name}-{token}", retries=self.retries, pure=False
            )
            futures[future] = unit
        try:
            for future in as_completed(list(futures), loop=self.client.loop):
                unit = futures.pop(future)
                try:
                    error = future.result()
                except KilledWorker as e:
                    error = ClusterError(
                        f"workers died while running it more than the scheduler's allowed-failures times "
                        f"(out of memory?): {_one_line(e)}"
                    )
                except FutureCancelledError as e:  # the scheduler went away (the client cancels what it waited for)
                    raise ClusterError(
                        f"lost {self.where} ({_one_line(e)}); units finished so far are cached: re-run to continue"
                    ) from None
                except ImportError as e:
                    raise ClusterError(
                        f"a worker could not import what a unit needs ({_one_line(e)}); every worker needs the "
                        "client's environment (the same relora-dynamics installed)"
                    ) from None
                yield unit, error
        finally:
            if futures and self.client is not None:  # left early (a failure without keep-going): stop the rest
                self.client.cancel(list(futures))
