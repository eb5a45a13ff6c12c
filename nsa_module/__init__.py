"""NSA ops on the TileLang kernels: validation, launchers, autograd Functions and the functional API."""
from .compressed import compress_mean, compressed_attention
from .nsa import nsa
from .selected import selected_attention
from .sliding import selected_sliding_attention, sliding_window_attention

__all__ = ["compress_mean", "compressed_attention", "nsa", "selected_attention", "selected_sliding_attention",
           "sliding_window_attention"]
