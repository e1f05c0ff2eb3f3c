"""What ``fedfusion site`` runs its SuperNode through: the site pins which apps it executes.

The ClientApp code a site runs is whatever the run submitter packed into the FAB, including the privacy policy and
ledger code meant to protect the site; code inside the FAB cannot be trusted to check itself. This module runs in
the SuperNode process (started from the site's own installation, never from a FAB) and checks every run's FAB
before Flower stores it for a ClientApp to execute:

* **app pins**: the site policy key ``allowed-apps`` (a list of SHA-256 hex digests of FABs, in the node config or
  ``<state>/privacy-policy.toml``; ``fedfusion site --allow-app``) lists the apps the site accepts. The digest is
  computed here from the FAB's bytes (the server's claimed hash is not trusted). A FAB not on a non-empty list is
  refused with Flower's ``INVALID_FAB`` error reply, every message of that run, and nothing of it is stored or run.
  An empty list admits any app with a WARNING (the site then trusts the coordinator's app as it stands).
  The list is re-read for every new run, so a pin added to the policy file applies without a restart.
* **Flower's home outside the state directory**: the ClientApp unpacks apps under ``$FLWR_HOME``; it must not be
  inside the site's state directory (ledger, policy), nor the other way round (:func:`check_flwr_home`).

Why not Flower's own ``--trusted-entities``: Flower 1.42 accepts a FAB there only when the SuperLink attached
signatures obtained from Flower Hub (``valid_license``); a FAB submitted with ``flwr run`` to the coordinator's
own SuperLink never has them, so every run would be refused, and hospital networks are offline anyway.

Flower internals used (flwr pinned < 1.50; :func:`install` refuses to start when they changed):
``flwr.supernode.start_client_internal._pull_and_store_message`` (keyword arguments ``state``, ``object_store``,
``receive``, ``get_run``, ``get_fab``), ``_insert_message`` and ``FAB_VERIFICATION_ERROR``.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("fedfusion.site")

__all__ = ["AppPins", "app_sha256", "check_flwr_home", "install", "main", "pinned_pull"]

#: Keyword arguments of Flower's ``_pull_and_store_message`` this module relies on.
_PULL_ARGS = {"state", "object_store", "receive", "get_run", "get_fab"}


class GuardError(RuntimeError):
    """The guard cannot protect the site as configured (the SuperNode must not start)."""


def app_sha256(path: Path | str) -> str:
    """SHA-256 hex digest of the FAB of ``path``: a ``.fab`` file as is, or an app folder as ``flwr run FOLDER``
    would build and submit it (Flower builds FABs byte-reproducibly: fixed zip timestamps)."""
    p = Path(path)
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    if not (p / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{p}: neither a .fab file nor an app folder with a pyproject.toml")
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(p)).hexdigest()


class AppPins:
    """The apps a site accepts, read from its policy (node config over ``<state>/privacy-policy.toml``)."""

    def __init__(self, state_dir: Path, node_config: dict[str, Any]) -> None:
        self.state_dir, self.node_config = Path(state_dir), dict(node_config)

    def allowed(self) -> tuple[str, ...]:
        """The current allowlist (re-read every call; an unreadable policy raises, so nothing is admitted)."""
        from client.privacy.policy import SitePolicy

        return SitePolicy.resolve(self.node_config, self.state_dir).allowed_apps

    def verdict(self, content: bytes) -> tuple[bool, str]:
        """``(admitted, digest)`` for a FAB's bytes."""
        digest = hashlib.sha256(content).hexdigest()
        try:
            allowed = self.allowed()
        except ValueError as exc:
            log.error("site policy unreadable, refusing every app until it is fixed: %s", exc)
            return False, digest
        if not allowed:
            log.warning("app %s admitted: this site pins no apps (allowed-apps is empty); it runs whatever the "
                        "coordinator submits", digest)
            return True, digest
        return digest in allowed, digest


def pinned_pull(original: Callable[..., Any], pins: AppPins) -> Callable[..., Any]:
    """Flower's ``_pull_and_store_message`` with the pin check in front of a run's first message.

    The wrapper receives the message itself, fetches the run and its FAB, and either answers with Flower's
    ``INVALID_FAB`` error reply (refused: the FAB is never stored, so no ClientApp can run it) or hands message,
    run and FAB to Flower's own function (admitted: no second download).
    """
    from flwr.app import Message
    from flwr.supercore.run import RunNotRunningException
    from flwr.supernode import start_client_internal as sci

    def pull(**kwargs: Any) -> Any:
        received = kwargs["receive"]()
        if received is None:
            return None
        message = received[0]
        run_id = message.metadata.run_id
        state = kwargs["state"]
        if state.get_run(run_id) is None:
            try:
                run = kwargs["get_run"](run_id)
                fab = kwargs["get_fab"](run.fab_hash, run_id)
            except RunNotRunningException:  # as Flower's own function: ignore the message of a stopped run
                log.info("run %s is not running; message ignored", run_id)
                return None
            admitted, digest = pins.verdict(fab.content)
            if not admitted:
                log.error("REFUSED run %s: its app (FAB sha256 %s) is not in this site's allowed-apps; nothing of it "
                          "runs here. Review the app and add its hash to the site policy to accept it.", run_id, digest)
                sci._insert_message(Message(sci.FAB_VERIFICATION_ERROR, reply_to=message), state,
                                    kwargs["object_store"])
                return run_id
            kwargs.update(get_run=lambda _run_id: run, get_fab=lambda _hash, _run_id: fab)
        kwargs["receive"] = lambda: received
        return original(**kwargs)

    return pull


def install(pins: AppPins) -> None:
    """Put :func:`pinned_pull` in front of Flower's message intake (in this process: the SuperNode's).

    Raises:
        GuardError: this Flower version does not have the internals the guard relies on.
    """
    from flwr.supernode import start_client_internal as sci

    original = getattr(sci, "_pull_and_store_message", None)
    if original is None or not all(hasattr(sci, n) for n in ("_insert_message", "FAB_VERIFICATION_ERROR")):
        raise GuardError("this Flower version lacks the SuperNode internals the app pins rely on; use flwr < 1.50")
    missing = _PULL_ARGS - set(inspect.signature(original).parameters)
    if missing:
        raise GuardError(f"Flower's _pull_and_store_message no longer takes {sorted(missing)}; use flwr < 1.50")
    sci._pull_and_store_message = pinned_pull(original, pins)


def check_flwr_home(state_dir: Path, flwr_home: Path | None = None) -> Path:
    """Flower's home (where apps are unpacked), refused when it overlaps the site's state directory.

    Raises:
        GuardError: naming both folders and how to fix it.
    """
    if flwr_home is None:
        from flwr.supercore.utils import get_flwr_home

        flwr_home = get_flwr_home()
    home, state = Path(flwr_home).expanduser().resolve(), Path(state_dir).expanduser().resolve()
    if home == state or state in home.parents or home in state.parents:
        raise GuardError(
            f"FLWR_HOME {home} overlaps the site's state directory {state}: an app unpacked there could overwrite "
            "the privacy ledger and policy. Set FLWR_HOME to a folder outside the state directory (e.g. "
            "/var/lib/fedfusion-site-flwr)."
        )
    return home


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m client.supernode_guard --state DIR -- <flower-supernode arguments>``: check, install, run."""
    import argparse

    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        raise SystemExit("usage: python -m client.supernode_guard --state DIR -- <flower-supernode arguments>")
    split = args.index("--")
    parser = argparse.ArgumentParser(prog="client.supernode_guard")
    parser.add_argument("--state", type=Path, required=True)
    ours = parser.parse_args(args[:split])
    supernode_args = args[split + 1:]
    from flwr.common.config import parse_config_args

    node_config = {}
    if "--node-config" in supernode_args:
        node_config = parse_config_args([supernode_args[supernode_args.index("--node-config") + 1]])
    try:
        check_flwr_home(ours.state)
        pins = AppPins(ours.state, node_config)
        install(pins)
        allowed = pins.allowed()
    except (GuardError, ValueError) as exc:
        raise SystemExit(f"fedfusion site: {exc}") from None
    # fedfusion's own lines only: a root handler would also print Flower's DEBUG records (its logger propagates)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fedfusion").addHandler(handler)
    logging.getLogger("fedfusion").setLevel(logging.INFO)
    log.info("app pins: %s", ", ".join(allowed) if allowed else "none (any app is admitted)")
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *supernode_args]
    flower_supernode()


if __name__ == "__main__":
    main()
