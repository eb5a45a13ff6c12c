"""NSA ops on the TileLang kernels: validation, launchers, autograd Functions, the functional API and
the NativeSparseAttention layer with its decode cache."""
from .cache import NSACache
from .compressed import compress_mean, compressed_attention
from .layer import NativeSparseAttention
from .nsa import nsa, selected_sliding_attention
from .selected import selected_attention
from .sliding import sliding_window_attention

__all__ = ["NSACache", "NativeSparseAttention", "compress_mean", "compressed_attention", "nsa",
           "selected_attention", "selected_sliding_attention", "sliding_window_attention"]
