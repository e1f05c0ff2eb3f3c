"""Site-side differential privacy: persistent accountant (``accountant``), site policy (``policy``), noise source
(``randomness``), Opacus wiring (``engine``, ``grad_samplers``) and a run's DP session (``session``).

Import the modules themselves: this package imports nothing, so the SuperNode's app guard
(:mod:`client.supernode_guard`) reads the site policy without loading torch and Opacus (Opacus configures the root
logger at import).
"""
