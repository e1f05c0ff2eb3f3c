"""Process supervision for everything fedfusion starts (SuperLink, SuperNodes, ``flwr`` CLI calls, Ray workers).

Used by the simulation runner (:mod:`simulations.flwr_run`), the deployment tooling of the CLI
(:mod:`fedfusion.deployment`, :mod:`fedfusion.loopback`) and the run observer: a layer below all of them.

Flower detaches its SuperExec helpers into new sessions and Ray re-parents its workers, so "stop what I started"
needs more than killing a process group: :class:`ProcessSet` remembers every pid it has seen below its processes
(children, and members of the sessions they lead) and signals all of them. Linux only (reads ``/proc``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

__all__ = ["ProcessSet", "Managed", "alive", "descendants", "session_members", "free_ports", "wait_port",
           "wait_until", "tree_rss_mb"]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that were free on ``host`` a moment ago (bind to port 0, read, release)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def wait_port(host: str, port: int, timeout: float) -> bool:
    """True once something accepts TCP connections on ``host:port`` (polls until ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            time.sleep(0.2)
    return False


def wait_until(
    condition: Callable[[], T], timeout: float, what: str, *, interval: float = 0.5,
    check: Callable[[], None] | None = None,
) -> T:
    """Call ``condition`` every ``interval`` seconds until it returns something truthy, and return that.

    ``check`` runs before each try; it raises to stop early (e.g. a process the wait depends on has exited).
    Raises :class:`TimeoutError` naming ``what`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f}s")
        time.sleep(interval)


def _proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, session, ...) per process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        # the command name is in parentheses and may contain spaces: split after the last ')'
        yield int(entry), stat[stat.rfind(")") + 2 :].split()


#: pid -> (parent pid, state letter, session id) of every process: one reading of /proc.
ProcTable = dict[int, tuple[int, str, int]]


def _proc_table() -> ProcTable:
    """pid -> (parent pid, state letter, session id) for every process, from /proc (Linux)."""
    return {pid: (int(rest[1]), rest[0], int(rest[3])) for pid, rest in _proc_stats()}


def descendants(pid: int, table: ProcTable | None = None) -> set[int]:
    """Every live (non-zombie) process below ``pid`` (children, grandchildren, …), in ``table`` (default: now)."""
    table = _proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for p, (ppid, _state, _sid) in table.items():
        children.setdefault(ppid, []).append(p)
    out, stack = set(), [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return {p for p in out if table.get(p, (0, "Z", 0))[1] != "Z"}


def session_members(sids: Iterable[int], table: ProcTable | None = None) -> set[int]:
    """Every live (non-zombie) process whose session id is in ``sids``, in ``table`` (default: now).

    A process keeps its session when its parent dies: Ray actors orphaned by a finished ``flwr-simulation``
    (re-parented to init) are still found through the session their detached SuperExec leads.
    """
    want = set(sids)
    table = _proc_table() if table is None else table
    return {pid for pid, (_ppid, state, sid) in table.items() if state not in ("Z", "X") and sid in want}


def alive(pids: Iterable[int]) -> set[int]:
    """The subset of ``pids`` still running (zombies count as gone)."""
    table = _proc_table()
    return {p for p in pids if p in table and table[p][1] not in ("Z", "X")}


@dataclass
class Managed:
    """One started process: its Popen, log file and every pid ever seen below it."""

    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path
    seen: set[int] = field(default_factory=set)
    #: Size of the log file when this process started: its own output begins there (the file is appended to).
    log_offset: int = 0

    def refresh(self, table: ProcTable | None = None) -> None:
        """Remember every process now below this one; ``table``: a /proc reading to reuse (default: read now)."""
        table = _proc_table() if table is None else table
        if self.popen.poll() is None:
            self.seen |= descendants(self.popen.pid, table)
        # Members of sessions led by our processes (Flower detaches its SuperExec with start_new_session; its
        # orphaned children keep that session). Our own session is never one of them: ours started new ones.
        self.seen |= session_members(({self.popen.pid} | self.seen) - {os.getsid(0)}, table) - {os.getpid()}

    def log_text(self) -> str:
        """The whole log file (every start of this name)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def output(self) -> str:
        """What this process (this start, not an earlier one of the same name) has written so far."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self.log_offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""


class ProcessSet:
    """Start named processes in their own sessions; stop them together with all their descendants.

    Flower detaches its SuperExec helpers into new sessions (``start_new_session=True``), so killing a process
    group is not enough: the set remembers every descendant pid it has seen (:meth:`refresh`, called by
    :meth:`stop` and periodically by the loopback driver) and signals those too.
    """

    def __init__(self, log_dir: Path, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(env or os.environ)
        self.cwd = cwd
        self.procs: dict[str, Managed] = {}
        self.all_pids: set[int] = set()

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Managed:
        if name in self.procs and self.procs[name].popen.poll() is None:
            raise RuntimeError(f"process {name!r} is already running (pid {self.procs[name].popen.pid})")
        log_path = self.log_dir / f"{name}.log"
        fh = open(log_path, "ab")  # noqa: SIM115 - owned by the child; closed below after the fork
        fh.write(f"\n===== start {name}: {' '.join(argv)}\n".encode())
        fh.flush()
        offset = fh.tell()
        popen = subprocess.Popen(
            list(argv), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**self.env, **(env or {})}, cwd=self.cwd, start_new_session=True,
        )
        fh.close()
        managed = Managed(name=name, argv=list(argv), popen=popen, log_path=log_path, log_offset=offset)
        self.procs[name] = managed
        self.all_pids.add(popen.pid)
        return managed

    def refresh(self) -> None:
        table = _proc_table()  # one reading of /proc for all of them
        for m in self.procs.values():
            m.refresh(table)
            self.all_pids |= m.seen

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop ``name`` and everything below it: ``sig`` first, SIGKILL after ``timeout`` seconds."""
        self.stop_many([name], sig, timeout)

    def stop_many(self, names: Iterable[str], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop several processes and everything below them at once (they shut down in parallel): ``sig`` to
        all, SIGKILL to what is left after ``timeout`` seconds."""
        managed = [self.procs[n] for n in names]
        if not managed:
            return
        table = _proc_table()
        for m in managed:
            m.refresh(table)
        pids = set().union(*({m.popen.pid} | m.seen for m in managed))
        self.all_pids |= pids
        _signal_all(pids, sig)
        deadline = time.monotonic() + timeout
        # poll() also reaps our direct children (a zombie would otherwise look alive to popen)
        while time.monotonic() < deadline and (alive(pids) or any(m.popen.poll() is None for m in managed)):
            time.sleep(0.1)
        table = _proc_table()
        for m in managed:
            m.refresh(table)  # orphans that appeared while the trees went down (same sessions)
            pids |= m.seen
        self.all_pids |= pids
        if alive(pids):
            _signal_all(alive(pids), signal.SIGKILL)
        for m in managed:
            try:
                m.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def kill(self, name: str) -> None:
        """SIGKILL ``name`` and its descendants at once (a crash, as in the fault tests)."""
        self.stop(name, sig=signal.SIGKILL, timeout=5.0)

    def stop_all(self, timeout: float = 10.0) -> set[int]:
        """Stop every process (reverse start order); returns the pids still alive afterwards (should be empty)."""
        self.refresh()
        for name in reversed(list(self.procs)):
            self.stop(name, timeout=timeout)
        left = alive(self.all_pids)
        if left:
            _signal_all(left, signal.SIGKILL)
            time.sleep(0.5)
            left = alive(self.all_pids)
        return left

    def running(self, name: str) -> bool:
        return name in self.procs and self.procs[name].popen.poll() is None


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            pgid = os.getpgid(pid)
        except ProcessLookupError:
            continue
        try:
            # Our children lead their own sessions (start_new_session): signal the whole group then.
            if pgid == pid:
                os.killpg(pgid, sig)
            else:
                os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def tree_rss_mb(pid: int | None = None) -> float:
    """Current resident memory of ``pid`` (default: this process) plus all its live descendants, MiB."""
    root = os.getpid() if pid is None else pid
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for p in {root, *descendants(root)}:
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue  # the process ended between the listing and the read
    return total / 2**20
