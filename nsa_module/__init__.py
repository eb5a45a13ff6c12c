"""NSA ops on the TileLang kernels: validation, launchers, autograd Functions and the functional API."""
from .selected import selected_attention

__all__ = ["selected_attention"]
