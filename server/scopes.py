"""The metrics-log scope of each site, from what the SuperLink knows, never from what a site says.

A reply's sender is ``msg.metadata.src_node_id``, set by the SuperLink from the authenticated connection; nothing
in the reply's content can change it. The scope of a node is

* the name the SuperLink has for it (``flwr supernode register KEY --name site-01``: the federation operator's
  registration, read through ``grid.get_nodes()``) when that name is a plain identifier (letters, digits,
  ``.``, ``_``, ``-``; at most 64 characters), is not ``global``, does not look like another node's default scope
  (``node-<digits>``), and no node seen earlier in this run (lower node ids first) got the same name;
* else ``node-<node id>`` (simulations: Flower's simulation engine registers nodes without names).

A node keeps the scope it got first for the whole run, so an offline node's late reply is logged where its earlier
ones are.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from models.runlog import GLOBAL_SCOPE

logger = logging.getLogger(__name__)

__all__ = ["SiteScopes", "node_scope"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DEFAULT = re.compile(r"node-[0-9]+")


def node_scope(node_id: int) -> str:
    """The default scope of a node: ``node-<node id>``."""
    return f"node-{int(node_id)}"


class SiteScopes:
    """Node id -> metrics-log scope, built from the SuperLink's node registry (see the module docstring)."""

    def __init__(self) -> None:
        self._scopes: dict[int, str] = {}

    def refresh(self, grid: Any) -> None:
        """Learn the names of the grid's nodes (``grid.get_nodes()``; a grid without names changes nothing)."""
        try:
            nodes: Iterable[Any] = list(grid.get_nodes())
        except Exception as exc:  # noqa: BLE001 - names are cosmetic: never fail a round over them
            logger.debug("node names unavailable (%s); scopes are node-<id>", exc)
            return
        for info in sorted(nodes, key=lambda n: int(n.node_id)):
            node = int(info.node_id)
            if node in self._scopes:
                continue
            name = str(getattr(info, "name", "") or "")
            if not name:
                continue
            if _NAME.fullmatch(name) is None or name == GLOBAL_SCOPE or _DEFAULT.fullmatch(name) is not None:
                logger.warning("node %d's registered name %r is not usable as a log scope; it is logged as %s",
                               node, name[:80], node_scope(node))
                self._scopes[node] = node_scope(node)
            elif name in self._scopes.values():
                logger.warning("node %d is registered with the name %r of another node; it is logged as %s",
                               node, name, node_scope(node))
                self._scopes[node] = node_scope(node)
            else:
                self._scopes[node] = name

    def scope(self, node_id: int) -> str:
        """The scope of ``node_id`` (``node-<id>`` for a node without a usable registered name)."""
        return self._scopes.get(int(node_id), node_scope(node_id))
