"""What every benchmark shares: one timer for all providers, FLOP formulas, the results file, the
table and the plot. Results go to benchmarks/results/<device>/<name>.json:
{"device", "commit", "config", "rows": [{"T", "provider", "pass", "ms"}]}.
"""
from __future__ import annotations

import json
import os
import subprocess
from typing import Callable, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def device_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'."""
    for key in ("h100", "h200", "a100", "b200", "l40"):
        if key in name.lower():
            return key
    return name.lower().replace(" ", "_")


def commit() -> str:
    """The code's commit: NSA_COMMIT when set (the GPU machine runs a copy of the working tree whose
    git metadata, where present, is not this checkout's), else git's HEAD (+dirty)."""
    if os.environ.get("NSA_COMMIT"):
        return os.environ["NSA_COMMIT"]
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "kernels", "nsa_module"],
                               cwd=os.path.dirname(HERE), stderr=subprocess.DEVNULL).returncode
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench_ms(fn: Callable[[], object], grad_to_none: Optional[list] = None, rep: int = 200) -> float:
    """Median milliseconds of fn over CUDA events, after warm-up (triton's do_bench)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=50, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def sdpa_provider(q, k, v, backend):
    """Full causal attention through SDPA (flash or cuDNN backend), K/V expanded to the HQ heads as
    in ../shared/ANCHORS.md. q `[B, T, HQ, K]`, k/v `[B, T, H, D]` -> (closure, its leaves)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    G = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2).detach().requires_grad_()
    kh = k.transpose(1, 2).repeat_interleave(G, 1).detach().requires_grad_()  # K/V expanded to HQ heads
    vh = v.transpose(1, 2).repeat_interleave(G, 1).detach().requires_grad_()
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run():
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
    return run, [qh, kh, vh]


def warm_up_gpu(seconds: float = 2.0) -> None:
    """Keep the GPU busy for a while so the first timed provider does not pay for clock ramp-up."""
    import time

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    t0 = time.time()
    while time.time() - t0 < seconds:
        for _ in range(20):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()


def fwd_bwd(fn: Callable[[], torch.Tensor], do: torch.Tensor) -> Callable[[], None]:
    """A closure running forward then backward with a fixed dO."""
    def run():
        fn().backward(do)
    return run


def time_providers(fns: dict, T: int, **extra) -> list[dict]:
    """Forward and forward+backward medians of every provider {name: (closure, leaves)}, in one loop so
    every provider goes through the same timer. A provider that fails (a peer that cannot run this
    shape) is reported and skipped. Rows: {T, provider, pass, ms, **extra}."""
    rows = []
    for name, (fn, leaves) in fns.items():
        try:
            ms_f = bench_ms(fn)
            ms_fb = bench_ms(fwd_bwd(fn, torch.randn_like(fn())), grad_to_none=leaves)
        except Exception as e:  # noqa: BLE001  reported, not fatal
            print(f"  {name} failed at T={T}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        rows += [dict(T=T, provider=name, **extra, **{"pass": p}, ms=ms) for p, ms in (("fwd", ms_f), ("fwdbwd", ms_fb))]
        print(f"  T={T} {name}: fwd {ms_f:.3f} ms, fwd+bwd {ms_fb:.3f} ms", flush=True)
    return rows


def attention_flops(T: int, HQ: int, K: int, V: int, keys_per_query: float, B: int = 1) -> float:
    """Forward FLOPs of attention where each query sees `keys_per_query` keys on average:
    2·(K + V) multiply-adds per (query head, key). Backward is 2.5x this (5 products of 2 in fwd)."""
    return 2.0 * B * T * HQ * keys_per_query * (K + V)


def write_results(name: str, device: str, config: dict, rows: list[dict]) -> str:
    out_dir = os.path.join(HERE, "results", device_slug(device))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"device": device, "commit": commit(), "config": config, "rows": rows}, f, indent=1)
    return path


def print_table(rows: list[dict], title: str = "") -> str:
    """Markdown table: one line per T, one column per (provider, pass)."""
    cols = []
    for r in rows:
        c = (r["provider"], r["pass"])
        if c not in cols:
            cols.append(c)
    Ts = sorted({r["T"] for r in rows})
    cell = {(r["T"], r["provider"], r["pass"]): r["ms"] for r in rows}
    lines = [f"### {title}"] if title else []
    lines.append("| T | " + " | ".join(f"{p} {s}" for p, s in cols) + " |")
    lines.append("|---" * (len(cols) + 1) + "|")
    for T in Ts:
        vals = [cell.get((T, p, s)) for p, s in cols]
        lines.append(f"| {T} | " + " | ".join("-" if v is None else f"{v:.3f} ms" for v in vals) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def plot(rows: list[dict], path: str, title: str) -> None:
    """ms against T on log-log axes, one line per (provider, pass)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len({r["pass"] for r in rows}), figsize=(12, 4.5), squeeze=False)
    for ax, p in zip(axes[0], sorted({r["pass"] for r in rows})):
        for prov in dict.fromkeys(r["provider"] for r in rows if r["pass"] == p):
            pts = sorted((r["T"], r["ms"]) for r in rows if r["pass"] == p and r["provider"] == prov)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=prov,
                    linewidth=2.5 if prov.startswith("ours") else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T (tokens)")
        ax.set_ylabel("ms")
        ax.set_title(f"{title}: {p}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
