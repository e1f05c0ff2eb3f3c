"""Networks, losses, metrics and the training/evaluation loop shared by client, server and simulations."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .network import FusionNet, build_model

__all__ = ["FusionNet", "build_model"]


def __getattr__(name: str) -> Any:
    # Lazy: importing models.config / models.modalities (CLI, readers) must not pay for torch + MONAI.
    if name in __all__:
        from . import network

        return getattr(network, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
