"""fedfusion's shared layer: what the site client, the server and the simulations all stand on.

Above :mod:`models` and below :mod:`client`, :mod:`server` and :mod:`simulations` (see docs/architecture.md):

- :mod:`common.layout` — where a federation's data lives on disk (site folders, the held-out set);
- :mod:`common.data` — readers (DICOM, NIfTI), the case dataset and the site inspection;
- :mod:`common.evaluation` — a model or checkpoint on a held-out set (every held-out evaluator goes through it);
- :mod:`common.runconfig` — the one run-config schema (``[tool.flwr.app.config]`` in pyproject.toml);
- :mod:`common.replies` — how a site says "no" (error codes the server reads);
- :mod:`common.processes`, :mod:`common.flwr_cli` — process trees and the ``flwr`` CLI, for the simulation
  runner and the deployment tooling.
"""
