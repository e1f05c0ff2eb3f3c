"""Warm ClientApp processes for a deployed site: ``fedfusion site`` forks them from a process that has the libraries
loaded.

Flower's SuperNode runs every message in a fresh ``flwr-clientapp`` process (its SuperExec starts one per task), and
each spent about 7.5 s of CPU before the ClientApp ran, 70 % of it importing torch, Opacus, MONAI and Flower. The
site daemon instead loads those libraries once (:data:`PRELOAD`) and serves the SuperExec's launches:

* a shim named ``flwr-clientapp`` (:func:`write_shim`, first on the SuperNode's ``PATH``) is what the SuperExec
  starts. It sends its arguments, working directory, environment and standard streams over a private Unix socket
  and exits with the exit code it gets back. When nothing answers on the socket it runs Flower's own
  ``flwr-clientapp`` instead, so a site never depends on this speed-up to work;
* the daemon (:class:`WarmParent`, single-threaded) forks one child per launch. The child takes the shim's streams,
  directory and environment, forgets every fedfusion module the daemon had loaded (the app is loaded from the
  run's FAB, exactly as in a fresh process: ``client``, ``common``, ``models``... are imported again from there) and
  runs Flower's ``flwr-clientapp`` main with the shim's arguments. One process per message still, as Flower
  intends: nothing of one message outlives it, except the site's on-disk caches.

The socket lives in a private directory (mode 0700) that only the site's user can reach; whoever can connect to it
could as well start ``flwr-clientapp`` themselves. Fork safety: the daemon has run no torch operation and holds only
idle library thread pools when it forks (a child builds its own; checked by tests/test_warm_clientapp.py), and it
never initialises CUDA.
"""

from __future__ import annotations

import array
import json
import logging
import os
import selectors
import signal
import socket
import stat
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("fedfusion.site")

__all__ = ["PRELOAD", "SHIM", "SOCKET_ENV", "WarmParent", "preload", "write_shim"]

#: Libraries the daemon imports once for all its ClientApp processes (what a fresh one spent its start-up on).
PRELOAD: tuple[str, ...] = (
    "numpy", "scipy", "torch", "opacus", "monai", "monai.metrics", "monai.transforms", "pydicom", "nibabel",
    "flwr.supernode.cli.flwr_clientapp", "flwr.supernode.runtime.run_clientapp",
)
#: Top-level packages of fedfusion: a child drops them so the run's FAB provides them, as in a fresh process.
OWN_PACKAGES: frozenset[str] = frozenset({"client", "common", "models", "server", "simulations", "fedfusion", "bench"})
#: The executable name Flower's SuperExec starts for a ClientApp task.
SHIM = "flwr-clientapp"
#: Environment variable naming the daemon's socket (set for the SuperNode and inherited by its SuperExec).
SOCKET_ENV = "FEDFUSION_WARM_SOCKET"
#: Longest request a shim may send (arguments and environment), bytes.
MAX_REQUEST = 1 << 20

_SHIM_SOURCE = '''#!{python} -S
# fedfusion site: hands this ClientApp launch to the site daemon's warm parent (client/warm.py); runs Flower's own
# flwr-clientapp when the daemon does not answer.
import array, json, os, socket, struct, sys
path = os.environ.get({socket_env!r}, "")
try:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
except OSError:
    os.execv({fallback!r}, [{fallback!r}, *sys.argv[1:]])
body = json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}}).encode()
sock.sendmsg([struct.pack("!I", len(body)) + body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
data = b""
while len(data) < 4:
    chunk = sock.recv(4 - len(data))
    if not chunk:
        sys.exit(1)
    data += chunk
sys.exit(struct.unpack("!i", data)[0])
'''


def preload(modules: tuple[str, ...] = PRELOAD) -> float:
    """Import ``modules`` (those that are installed); returns the seconds it took."""
    import importlib

    t0 = time.perf_counter()
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            log.debug("warm ClientApps: %s is not installed; not preloaded", name)
    return time.perf_counter() - t0


def write_shim(directory: Path, socket_path: Path, python: str = sys.executable) -> Path:
    """Write the ``flwr-clientapp`` shim into ``directory/bin`` (put that folder first on the SuperNode's PATH);
    returns the folder. Its fallback is the real ``flwr-clientapp`` of this environment."""
    fallback = Path(python).parent / SHIM
    if not fallback.exists():
        import shutil

        found = shutil.which(SHIM)
        if found is None:
            raise FileNotFoundError(f"{SHIM} is not installed next to {python} nor on PATH; install flwr")
        fallback = Path(found)
    bindir = Path(directory) / "bin"
    bindir.mkdir(mode=0o700, parents=True, exist_ok=True)
    shim = bindir / SHIM
    shim.write_text(_SHIM_SOURCE.format(python=python, socket_env=SOCKET_ENV, fallback=str(fallback)))
    shim.chmod(stat.S_IRWXU)
    return bindir


@dataclass
class _Launch:
    """A forked child and the shim connection waiting for its exit code."""

    conn: socket.socket
    pid: int
    started: float = field(default_factory=time.monotonic)


class WarmParent:
    """The daemon's side: a private socket directory with the shim, and the loop that forks a child per launch.

    Use :meth:`create`, give :attr:`env` to the SuperNode, then :meth:`serve` until it exits; :meth:`close` removes
    the directory (children still running finish on their own).
    """

    def __init__(self, directory: Path, owned: bool, main: Callable[[], None] | None = None) -> None:
        self._main = main or _flower_clientapp_main
        self.directory = Path(directory)
        self.socket_path = self.directory / "clientapp.sock"
        self.bindir = write_shim(self.directory, self.socket_path)
        self._owned = owned
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.socket_path))
        os.chmod(self.socket_path, stat.S_IRUSR | stat.S_IWUSR)
        self._listener.listen(16)
        self._listener.setblocking(False)
        self._launches: dict[int, _Launch] = {}
        self.served = 0

    @classmethod
    def create(cls, directory: Path | None = None, main: Callable[[], None] | None = None) -> "WarmParent":
        """Socket and shim in ``directory`` (default: a new private temporary folder, removed by :meth:`close`).
        ``main``: what a child runs with the shim's ``sys.argv`` (default: Flower's ``flwr-clientapp``)."""
        if directory is None:
            return cls(Path(tempfile.mkdtemp(prefix="fedfusion-warm-")), owned=True, main=main)
        Path(directory).mkdir(mode=0o700, parents=True, exist_ok=True)
        return cls(Path(directory), owned=False, main=main)

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` with the shim first on ``PATH`` and the socket named (for the SuperNode and its SuperExec)."""
        out = dict(base)
        out["PATH"] = f"{self.bindir}{os.pathsep}{base.get('PATH', '')}"
        out[SOCKET_ENV] = str(self.socket_path)
        return out

    # -- the loop ----------------------------------------------------------------------------------------------
    def serve(self, stop: Callable[[], bool], poll: float = 0.2) -> None:
        """Fork a child per shim request until ``stop()`` is true (checked every ``poll`` seconds), reaping children
        and answering each shim with its child's exit code."""
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            while not stop():
                try:
                    ready = sel.select(timeout=poll)
                except InterruptedError:  # a forwarded signal
                    ready = []
                for _key, _events in ready:
                    self._accept()
                self._reap()
        self._reap()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(True)
        conn.settimeout(10.0)
        try:
            request, fds = _receive(conn)
        except (OSError, ValueError) as exc:
            log.warning("warm ClientApps: bad launch request ignored (%s)", exc)
            conn.close()
            return
        sys.stdout.flush()  # nothing buffered here may be written twice (by the child too)
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            self._listener.close()
            conn.close()
            _become_clientapp(request, fds, self._main)
        for fd in fds:
            os.close(fd)
        self._launches[pid] = _Launch(conn, pid)
        self.served += 1

    def _reap(self) -> None:
        for pid in list(self._launches):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
                code = os.waitstatus_to_exitcode(status) if done == pid else 0
            except ChildProcessError:  # reaped elsewhere: its exit code is lost
                done, code = pid, 1
            if done == 0:
                continue
            launch = self._launches.pop(pid)
            try:
                launch.conn.sendall(struct.pack("!i", code if code >= 0 else 128 - code))
            except OSError:
                pass  # the shim is gone (killed with its SuperExec); nothing to tell
            launch.conn.close()

    def close(self) -> None:
        """Stop listening and remove the socket (and the directory when it was created here)."""
        self._listener.close()
        for launch in self._launches.values():
            launch.conn.close()
        self.socket_path.unlink(missing_ok=True)
        if self._owned:
            import shutil

            shutil.rmtree(self.directory, ignore_errors=True)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """One shim request: ``{"argv", "cwd", "env"}`` and its three standard stream descriptors."""
    fds = array.array("i")
    msg, ancdata, _flags, _addr = conn.recvmsg(MAX_REQUEST, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    if len(msg) < 4:
        raise ValueError("short request")
    (size,) = struct.unpack("!I", msg[:4])
    body = msg[4:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ValueError("truncated request")
        body += chunk
    request = json.loads(body)
    if not isinstance(request, dict) or not isinstance(request.get("argv"), list) or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("malformed request")
    return request, list(fds)


def _flower_clientapp_main() -> None:
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    flwr_clientapp()


def _become_clientapp(request: dict, fds: list[int], main: Callable[[], None]) -> None:
    """In the forked child: take the shim's streams, directory and environment, drop fedfusion's modules and run
    ``main`` (Flower's ``flwr-clientapp``) with the shim's arguments; exits with its code."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir(str(request.get("cwd") or "/"))
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in dict(request.get("env") or {}).items()})
        for name in [m for m in sys.modules if m.split(".", 1)[0] in OWN_PACKAGES]:
            del sys.modules[name]
        sys.argv = [SHIM, *[str(a) for a in request["argv"]]]
        # fresh handlers: the daemon's (and their locks) must not be written to from here
        logging.getLogger().handlers.clear()
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report and exit: a child must never return into the daemon's loop
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
