"""The coordinator's SuperLink with the Control API reachable by administrators only.

Flower 1.42's ``flower-superlink`` serves the Fleet API (SuperNodes), the Control API (``flwr run``/``ls``/
``supernode register``: submitting runs and registering keys) and the Runtime API (the ServerApp) from one FastAPI
app on one ``--host/--port``; its ``--control-api-address``/``--fleet-api-address`` flags are deprecated no-ops. So
any site that reaches the port and trusts the CA could submit runs and register keys.

``fedfusion superlink`` runs Flower's own SuperLink app (same arguments, same lifespan, same state) behind two
listeners in one process:

* the **control listener** (``--control-address``, default ``127.0.0.1:9093``) serves everything, as
  ``flower-superlink --host/--port`` would; the Runtime API address the SuperLink gives its ServerApp processes is
  this one. Administrators reach it on the machine or through an SSH tunnel / admin network;
* the **fleet listener** (``--fleet-address``, default ``0.0.0.0:9092``) serves only the Fleet API paths
  (``/v1/fleet/<method>``) with the same TLS certificate; any other path is answered ``404`` before it reaches
  Flower.

Flower internals used (flwr pinned < 1.50): ``flwr.superlink.cli.flower_superlink._parse_superlink_lifespan_config``
and ``SuperLinkLifespan``, ``flwr.superlink.main.create_app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from typing import Any

from fedfusion.deployment import DEFAULT_CONTROL_ADDRESS

#: Paths the fleet listener forwards: the Fleet API's methods, nothing else (no ``..``, no other prefix).
FLEET_PATH = re.compile(r"/v1/fleet/[a-z][a-z0-9-]*")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class FleetOnly:
    """ASGI app forwarding Fleet API requests to ``app`` and answering 404 to anything else."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and FLEET_PATH.fullmatch(scope.get("path", "")) and not scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "http":
            body = b'{"detail": "not served on the Fleet API listener"}'
            await send({"type": "http.response.start", "status": 404,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})


def split_address(address: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as ``(host, port)``; ValueError naming ``what`` otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{what} {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def flower_argv(flower_args: Sequence[str], control_address: str) -> list[str]:
    """``flower-superlink`` arguments with ``--host/--port`` set to the control listener.

    Raises:
        ValueError: ``flower_args`` set ``--host``/``--port`` themselves (the listeners are this command's).
    """
    clash = [a for a in flower_args if a.split("=")[0] in ("--host", "--port")]
    if clash:
        raise ValueError(f"give the listeners with --fleet-address/--control-address, not {clash}")
    host, port = split_address(control_address, "--control-address")
    return ["flower-superlink", *flower_args, "--host", host, "--port", str(port)]


def _server(config: Any) -> Any:
    """A uvicorn server that leaves signal handling to :func:`serve` (two servers share one process)."""
    import uvicorn

    class Quiet(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return Quiet(config)


def serve(flower_args: Sequence[str], *, fleet_address: str, control_address: str = DEFAULT_CONTROL_ADDRESS) -> None:
    """Run Flower's SuperLink app behind the control and fleet listeners until SIGINT/SIGTERM (see the module)."""
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import SuperLinkLifespan, _parse_superlink_lifespan_config
    from flwr.superlink.main import create_app

    fleet_host, fleet_port = split_address(fleet_address, "--fleet-address")
    sys.argv = flower_argv(flower_args, control_address)
    config = _parse_superlink_lifespan_config()
    app = create_app(config, SuperLinkLifespan)
    common: dict[str, Any] = dict(ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile, access_log=True,
                                  log_config=get_uvicorn_log_config(console_handler.level), workers=1)
    control = _server(uvicorn.Config(app=app, host=config.host, port=config.port, lifespan="on", **common))
    # no lifespan here: the control listener's runs Flower's (state, SuperExec) once for both
    fleet = _server(uvicorn.Config(app=FleetOnly(app), host=fleet_host, port=fleet_port, lifespan="off", **common))

    def stop(_signum: int, _frame: object) -> None:
        for server in (control, fleet):
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)

    async def both() -> None:
        task = asyncio.create_task(control.serve())
        while not control.started and not task.done():  # Flower's lifespan first, then open the fleet port
            await asyncio.sleep(0.05)
        if task.done():
            await task
            return
        try:
            await fleet.serve()
        finally:
            control.should_exit = True
            await task

    asyncio.run(both())
