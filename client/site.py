"""Who this site is and where its data and state live, from the node config; its secret salt; and how it says "no".

Where a site's settings come from:

* node config (deployment: ``flower-supernode --node-config`` or ``fedfusion site``): ``data-dir`` (the site
  folder), ``state-dir``, ``series-map``, ``device`` (auto|cpu|cuda), ``num-threads`` and the privacy policy keys
  (see :mod:`client.privacy.policy`).
* simulation: node config has only ``partition-id``/``num-partitions``; the partition's folder and state directory
  follow :mod:`common.layout` (``<data-dir>/site-*`` in name order, ``<run-dir>/site-state/<site>``); its
  preprocessed cases are cached once per data set (``<data-dir>/.fedfusion-cache/<site>``), not per run.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common import replies
from common.layout import derived_cache_dir, partition_site, simulated_state_dir

log = logging.getLogger("fedfusion.site")

__all__ = ["SALT_FILE", "SiteDecline", "SiteSettings", "resolve_site", "resolve_torch_device", "site_salt"]

#: The site's secret salt (hex), in its state directory: keys patient identifiers and the validation split.
SALT_FILE = "site-salt"


class SiteDecline(Exception):
    """The site will not do what was asked; becomes an error reply with ``code`` (see :mod:`common.replies`)."""

    def __init__(self, code: int, text: str, **numbers: float) -> None:
        self.code = code
        self.reason = replies.make_reason(code, text, **numbers)
        super().__init__(self.reason)


@dataclass(frozen=True)
class SiteSettings:
    """Where one site's data and state live and how it computes.

    Attributes:
        site_dir: the site folder (case folders + labels.csv).
        state_dir: the site's persistent state (privacy ledger, policy file, caches).
        series_map: optional SeriesDescription → modality rules file.
        device: ``auto``, ``cpu`` or ``cuda[:i]``.
        num_threads: torch CPU threads (0 = leave as is).
        node_config: the raw node config (policy keys are read from it).
        cache_dir: where the preprocessed cases (``preprocessed/``) and the salt keying their patient identifiers
            live: the state directory of a deployed site; for a simulated site the data set's shared cache
            (:func:`common.layout.derived_cache_dir`), so that every run over the same data reuses it.
    """

    site_dir: Path
    state_dir: Path
    series_map: Path | None
    device: str
    num_threads: int
    node_config: tuple[tuple[str, Any], ...]
    cache_dir: Path

    @property
    def site_name(self) -> str:
        return self.site_dir.name

    @property
    def site_index(self) -> float:
        """The site's number for the server's logs: node config ``site-index``, else the NN of a ``site-NN`` folder,
        else NaN (the server then names the site by its node id). A site number, never anything about patients."""
        given = dict(self.node_config).get("site-index")
        if given is not None:
            return float(given)
        m = re.fullmatch(r"site-(\d+)", self.site_name)
        return float(m.group(1)) if m else float("nan")


def resolve_site(node_config: Mapping[str, Any], run_config: Mapping[str, Any]) -> SiteSettings:
    """Site settings from the node config (deployment) or from the partition id (simulation).

    Raises:
        SiteDecline(NO_USABLE_DATA): when the site folder cannot be found, saying what to set.
    """
    nc = dict(node_config)
    data_dir = str(nc.get("data-dir", "") or "")
    if data_dir:
        site_dir = Path(data_dir).expanduser().resolve()
        default_state = site_dir.parent / f"{site_dir.name}-state"
        cache_dir: Path | None = None
    elif "partition-id" in nc:
        try:
            site_dir = partition_site(Path(str(run_config["data-dir"])).expanduser().resolve(), int(nc["partition-id"]))
        except (OSError, ValueError) as exc:
            log.error("simulated site: %s", exc)  # names local paths: stays in the site log
            raise SiteDecline(
                replies.NO_USABLE_DATA,
                f"simulation partition {nc['partition-id']} has no site folder in the run config's data-dir; make "
                "num-supernodes match the number of site folders",
            ) from exc
        default_state = simulated_state_dir(Path(str(run_config["run-dir"])).expanduser().resolve(), site_dir.name)
        cache_dir = derived_cache_dir(site_dir)
    else:
        raise SiteDecline(
            replies.NO_USABLE_DATA,
            "this SuperNode has no data-dir in its node config; start it with "
            "--node-config \"data-dir='/path/to/site' state-dir='/path/to/state'\"",
        )
    state_dir = Path(str(nc.get("state-dir", "") or default_state)).expanduser().resolve()
    smap = str(nc.get("series-map", "") or "")
    return SiteSettings(
        site_dir=site_dir,
        state_dir=state_dir,
        series_map=Path(smap).expanduser().resolve() if smap else None,
        device=str(nc.get("device", "auto") or "auto"),
        num_threads=int(nc.get("num-threads", 0) or 0),
        node_config=tuple(sorted((str(k), v) for k, v in nc.items())),
        cache_dir=cache_dir or state_dir,
    )


def resolve_torch_device(name: str) -> torch.device:
    """``auto`` → CUDA when present else CPU; an unknown name or ``cuda`` without a GPU is a clear decline."""
    from models.training import resolve_device

    try:
        return resolve_device(name)
    except ValueError as exc:
        raise SiteDecline(replies.BAD_REQUEST, f"node config device: {exc}") from exc


def site_salt(state_dir: Path) -> bytes:
    """The site's secret salt, created once (32 random bytes, file mode 0600) and the same in every later process.

    It keys patient identifiers (:func:`common.data.dicom_reader.patient_key`) and the validation split
    (:mod:`client.holdout`), so neither can be recomputed by anyone who lacks the site's state directory. Creation
    is create-if-absent (a hard link of a finished temporary file): two processes starting at once agree on one salt.

    Raises:
        ValueError: the salt file exists but is not what this function writes (the site must not silently change
            its salt: patient grouping and the validation split would change with it).
    """
    path = Path(state_dir) / SALT_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{SALT_FILE}.", dir=path.parent)  # 0600 from creation
        try:
            with os.fdopen(fd, "w", encoding="ascii") as fh:
                fh.write(secrets.token_hex(32) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won the race: use its salt
        finally:
            Path(tmp).unlink(missing_ok=True)
    text = path.read_text(encoding="ascii", errors="replace").strip()
    try:
        salt = bytes.fromhex(text)
    except ValueError:
        salt = b""
    if len(salt) != 32:
        raise ValueError(
            f"the site salt {path} is damaged (expected 64 hex digits); restore it from backup. Deleting it makes "
            "a new salt: the validation split changes, so cases evaluated before may then be trained on."
        )
    return salt
