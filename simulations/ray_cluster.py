"""The Ray cluster a simulation's virtual sites run on: a private local one, or an existing one (``--ray-address``).

fedfusion starts (or joins) Ray itself, before Flower's simulation engine does: Flower's backend then finds Ray
initialised and only creates its actor pool on it (``RayBackend.init_ray`` is a no-op then). Either way the
workers get the same environment: this interpreter's ``sys.path`` as ``PYTHONPATH`` (what Flower passes too), one
thread per CPU share (``OMP_NUM_THREADS``), sleeping rather than spinning OpenMP waits (``OMP_WAIT_POLICY=PASSIVE``
unless set), and fedfusion's own variables (:data:`FORWARDED`: the timings file of
the benches, the bound on cached site runtimes).

An existing cluster (``ray start --head`` on one machine, ``ray start --address HEAD`` on the others) must run
this same fedfusion environment at the same path on every node, and the run config's ``data-dir`` and ``run-dir``
must be the same shared folders everywhere: a virtual site reads its cases from ``data-dir`` and keeps its
privacy ledger under ``run-dir`` on whichever node runs it. Disconnecting at the end leaves that cluster running;
a private cluster is shut down.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

from common import timings
from client.runtime_cache import ENV as RUNTIMES_ENV

__all__ = ["FORWARDED", "RayClusterError", "connect", "disconnect", "worker_env"]

log = logging.getLogger("fedfusion.simulate")

#: fedfusion's environment variables that the workers of a simulation get when the driver has them.
FORWARDED: tuple[str, ...] = (timings.ENV, RUNTIMES_ENV)


class RayClusterError(RuntimeError):
    """Ray could not be started or joined (the message says which address and why)."""


def worker_env(cpus_per_site: float | None) -> dict[str, str]:
    """Environment variables every Ray worker of the simulation gets."""
    env = {
        "PYTHONPATH": os.pathsep.join([*sys.path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]),
        "OMP_NUM_THREADS": str(max(1, int(cpus_per_site or 1))),
        # threads that wait for work sleep instead of spinning on cores the other sites and the server need
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }
    env.update({k: os.environ[k] for k in FORWARDED if os.environ.get(k)})
    return env


def connect(init_args: dict[str, Any], cpus_per_site: float | None, address: str | None = None) -> dict[str, Any]:
    """Start a private Ray cluster with ``init_args`` (:func:`simulations.observer.backend_config`'s), or join the
    one at ``address`` (``HOST:PORT`` of its head, as ``ray start --head`` prints); returns the cluster's total
    resources (``CPU``, ``GPU``, ...).

    Raises:
        RayClusterError: nothing answers at ``address``, or Ray fails to start.
    """
    if address:
        _check_reachable(address)
    import ray

    if ray.is_initialized():
        ray.shutdown()
    runtime_env = {"env_vars": worker_env(cpus_per_site)}
    try:
        if address:
            # an existing cluster sets its own resources; Ray refuses num_cpus/num_gpus when joining one
            ray.init(address=address, runtime_env=runtime_env, logging_level=init_args.get("logging_level", logging.ERROR),
                     log_to_driver=bool(init_args.get("log_to_driver", False)))
            log.info("joined the Ray cluster at %s: %s", address, ray.cluster_resources())
        else:
            ray.init(runtime_env=runtime_env, **init_args)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        hint = (" (is `ray start --head` running there, and is this the address it printed?)" if address else "")
        raise RayClusterError(f"could not start or join {where}: {exc}{hint}") from exc
    return dict(ray.cluster_resources())


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    # Ray's own client retries a dead address for minutes before it gives up (and installs signal handlers in the
    # meantime): a TCP connect says at once whether anything listens there
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RayClusterError(f"Ray address {address!r} is not HOST:PORT (as `ray start --head` prints it)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise RayClusterError(f"nothing answers at the Ray cluster address {address} ({exc}); is `ray start --head` "
                              "running there, and is this the address it printed?") from exc


def disconnect() -> None:
    """Leave Ray: stops a private cluster with its workers; only disconnects from an existing one."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # pragma: no cover - best effort at teardown
        log.debug("ray shutdown failed", exc_info=True)
