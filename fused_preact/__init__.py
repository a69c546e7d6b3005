"""fused_preact: fused BatchNorm -> ReLU -> conv pre-activation residual blocks for PyTorch."""
from . import ops  # noqa: F401  (registers the torch.library ops)
from .convert import convert
from .backends.base import BackendNotSupported
from .dispatch import use_backend
from .nn import FusedBNReLUConv2d, PreActBlock, PreActBottleneck
from . import models

__version__ = "0.1.0"
__all__ = ["BackendNotSupported", "FusedBNReLUConv2d", "PreActBlock", "PreActBottleneck", "convert",
           "models", "use_backend"]
