"""NSA ops on the TileLang kernels: validation, launchers, autograd Functions, the functional API and
the NativeSparseAttention layer with its decode cache."""
from .cache import NSACache
from .compressed import compress_mean, compressed_attention
from .distributed import context_parallel_nsa, shard_sequence, unshard_sequence
from .layer import NativeSparseAttention
from .nsa import nsa, selected_sliding_attention
from .selected import selected_attention
from .sliding import sliding_window_attention

__all__ = ["NSACache", "NativeSparseAttention", "compress_mean", "compressed_attention", "context_parallel_nsa",
           "nsa", "selected_attention", "selected_sliding_attention", "shard_sequence", "sliding_window_attention",
           "unshard_sequence"]
