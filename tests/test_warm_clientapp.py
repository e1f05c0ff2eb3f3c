"""The site daemon's warm ClientApp launches (client/warm.py): a shim started the way Flower's SuperExec starts
``flwr-clientapp`` runs its work in a child forked from a parent that has torch loaded, with the shim's arguments,
directory, environment and streams and its exit code; the shim runs Flower's own ``flwr-clientapp`` when no daemon
answers; a daemon has no torch thread pool running when it forks. Each scenario runs in a fresh interpreter (a
forked pytest process would carry whatever earlier tests left behind)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from client.warm import SHIM, SOCKET_ENV, write_shim

REPO = Path(__file__).resolve().parents[1]

# The parent: loads torch (as the daemon preloads it), then serves exactly one launch of the shim. The child's
# "ClientApp" checks that it runs with the shim's argv, cwd and environment, that fedfusion's modules were dropped
# (a FAB provides them), trains a convolution on 2 threads (a fork-safety check: its own thread pool) and exits 3.
PARENT = textwrap.dedent("""
    import os, subprocess, sys
    from pathlib import Path
    from client.warm import WarmParent, preload
    import common.runconfig  # a fedfusion module the child must not keep

    def child_main():
        import torch
        assert sys.argv[1:] == ["--token", "abc"], sys.argv
        assert os.getcwd() == os.path.realpath(os.environ["EXPECTED_CWD"])
        assert os.environ["ONLY_IN_SHIM"] == "yes"
        assert "common.runconfig" not in sys.modules
        torch.set_num_threads(2)
        x = torch.randn(4, 4, 8, 16, 16, requires_grad=True)
        torch.nn.Conv3d(4, 4, 3, padding=1)(x).sum().backward()
        print("child trained", flush=True)
        sys.exit(3)

    preload(("numpy", "torch"))
    parent = WarmParent.create(Path(sys.argv[1]), main=child_main)
    env = parent.env(dict(os.environ))
    env.update(ONLY_IN_SHIM="yes", EXPECTED_CWD=sys.argv[2])
    shim = subprocess.Popen(["flwr-clientapp", "--token", "abc"], env=env, cwd=sys.argv[2],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parent.serve(stop=lambda: shim.poll() is not None)
    out, err = shim.communicate(timeout=60)
    parent.close()
    print(f"shim exit {shim.returncode} served {parent.served}")
    print("shim stdout:", out.strip())
    print("shim stderr:", err.strip()[-2000:])
""")


def _python(code: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_shim_runs_in_a_forked_warm_child(tmp_path: Path) -> None:
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    proc = _python(PARENT, str(tmp_path / "warm"), str(workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shim exit 3 served 1" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "shim stdout: child trained" in proc.stdout, proc.stdout
    assert not (tmp_path / "warm" / "clientapp.sock").exists()  # closed: the socket is gone


def test_shim_without_daemon_runs_flowers_clientapp(tmp_path: Path) -> None:
    bindir = write_shim(tmp_path / "warm", tmp_path / "warm" / "clientapp.sock")
    env = {**os.environ, SOCKET_ENV: str(tmp_path / "nobody-listens.sock")}
    proc = subprocess.run([str(bindir / SHIM), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--runtime-api-address" in proc.stdout  # Flower's own flwr-clientapp answered
    assert oct((bindir / SHIM).stat().st_mode & 0o777) == oct(0o700)


def test_daemon_holds_no_running_thread_pool_after_preloading() -> None:
    """What makes forking safe: preloading starts no torch/OpenMP work (only idle library pools) and no Python
    thread, and leaves CUDA uninitialised."""
    code = textwrap.dedent("""
        import threading
        from client.warm import preload
        preload()
        import torch
        assert threading.active_count() == 1, threading.enumerate()
        assert not torch.cuda.is_initialized()
        print("ok")
    """)
    proc = _python(code)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
