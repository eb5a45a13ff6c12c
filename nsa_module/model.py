"""A small LLaMA-style decoder with NSA (or full attention, for comparison): what the examples train.

Pre-norm blocks of RMSNorm → attention → RMSNorm → SwiGLU MLP, tied input/output embeddings.
`attention="nsa"` uses NativeSparseAttention (the kernels on CUDA with fp16/bf16, the reference
elsewhere); `attention="full"` is causal GQA attention through SDPA with the same RoPE.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import NSACache
from .layer import NativeSparseAttention, rope


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class FullAttention(nn.Module):
    """Causal GQA attention with RoPE (the baseline the examples compare NSA against)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, rope_theta: float = 10000.0):
        super().__init__()
        self.HQ, self.H, self.K, self.theta = num_heads, num_kv_heads, head_dim, rope_theta
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, **_):
        B, T, _ = x.shape
        pos = torch.arange(T, device=x.device)
        q = rope(self.q_proj(x).view(B, T, self.HQ, self.K), pos, self.theta).transpose(1, 2)
        k = rope(self.k_proj(x).view(B, T, self.H, self.K), pos, self.theta).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.H, self.K).transpose(1, 2)
        G = self.HQ // self.H
        o = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), None


class Block(nn.Module):
    def __init__(self, hidden_size: int, attention: nn.Module, mlp_ratio: int = 4):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(hidden_size), RMSNorm(hidden_size)
        self.attn = attention
        self.gate_up = nn.Linear(hidden_size, 2 * mlp_ratio * hidden_size, bias=False)
        self.down = nn.Linear(mlp_ratio * hidden_size, hidden_size, bias=False)

    def forward(self, x, cache=None, use_cache=False):
        a, cache = self.attn(self.norm1(x), cache=cache, use_cache=use_cache)
        x = x + a
        g, u = self.gate_up(self.norm2(x)).chunk(2, -1)
        return x + self.down(F.silu(g) * u), cache


class ToyLM(nn.Module):
    """Token ids `[B, T]` -> logits `[B, T, vocab]`.

    Args:
        vocab_size, hidden_size, num_layers, num_heads, num_kv_heads, head_dim: the model's shape.
        attention: "nsa" or "full".
        **nsa: NativeSparseAttention's arguments (compress_block, block_size, window_size, ...).
    """

    def __init__(self, vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                 num_kv_heads: int = 1, head_dim: int = 16, attention: str = "nsa", **nsa):
        super().__init__()
        if attention not in ("nsa", "full"):
            raise ValueError(f"attention must be 'nsa' or 'full', got {attention!r}")

        def make_attn():
            if attention == "full":
                return FullAttention(hidden_size, num_heads, num_kv_heads, head_dim)
            return NativeSparseAttention(hidden_size, num_heads, num_kv_heads, head_dim, **nsa)

        self.embed = nn.Embedding(vocab_size, hidden_size)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied with the output: small logits at the start
        self.blocks = nn.ModuleList(Block(hidden_size, make_attn()) for _ in range(num_layers))
        self.norm = RMSNorm(hidden_size)

    def forward(self, ids: torch.Tensor, caches: Optional[list[NSACache]] = None, use_cache: bool = False):
        """Logits; with use_cache (NSA only) also the per-layer caches, to continue with `step`."""
        x = self.embed(ids)
        new = []
        for i, block in enumerate(self.blocks):
            x, c = block(x, cache=None if caches is None else caches[i], use_cache=use_cache)
            new.append(c)
        logits = self.norm(x) @ self.embed.weight.T
        return (logits, new) if use_cache or caches is not None else logits

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, steps: int):
        """Greedy continuation of prompt `[N, P]` by `steps` tokens with the NSA caches; returns the
        tokens `[N, steps]` and the caches (their `reads` hold the last step's tokens read)."""
        logits, caches = self(prompt, use_cache=True)
        out = [logits[:, -1].argmax(-1)]
        for _ in range(steps - 1):
            logits, caches = self(out[-1][:, None], caches=caches)
            out.append(logits[:, -1].argmax(-1))
        return torch.stack(out, 1), caches


def train(model: nn.Module, make_batch, loss_fn, steps: int, lr: float = 3e-3, desc: str = "train",
          eval_fn=None, eval_every: int = 25, stop_at: Optional[float] = None, log=None):
    """AdamW over `steps` batches (with a tqdm bar): `loss_fn(model, *make_batch())` -> scalar loss.
    With `eval_fn` (a metric, higher is better) checked every `eval_every` steps, training stops
    once it reaches `stop_at`. Returns the list of losses."""
    from tqdm import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    bar = tqdm(range(steps), desc=desc, file=log)
    for step in bar:
        loss = loss_fn(model, *make_batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if eval_fn is not None and (step + 1) % eval_every == 0:
            metric = eval_fn(model)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", metric=f"{metric:.3f}")
            if stop_at is not None and metric >= stop_at:
                break
        else:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
