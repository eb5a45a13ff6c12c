"""What every benchmark shares: one timer for all providers, FLOP formulas, the results file, the
table and the plot. Results go to benchmarks/results/<device>/<name>.json:
{"device", "commit", "config", "rows": [{"T", "provider", "pass", "ms"}]}.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import textwrap
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


def plot_results_file(path: str) -> str:
    """Draw results/<device>/<name>.json's figure beside it, <name>.png, as run_all.py renders it."""
    with open(path) as f:
        res = json.load(f)
    png = os.path.splitext(path)[0] + ".png"
    plot_results(res, png, os.path.splitext(os.path.basename(path))[0])
    return png


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


# One colour per provider in every figure: ours in warm colours, the peers in cool ones. Providers
# not listed (a profile's variants) take FALLBACK_COLOURS in order of appearance.
PROVIDER_COLOURS = {
    "ours": "#d62728", "ours_paper": "#ff7f0e", "ours_eager": "#8c564b", "ours_slc_swa": "#e377c2",
    "ours_slc": "#bcbd22", "ours_local": "#ff9896",
    "fla": "#2ca02c", "fla_local": "#98df8a", "flex_window": "#17becf",
    "sdpa_flash": "#1f77b4", "sdpa_flash_graph": "#6baed6", "sdpa_cudnn": "#9467bd", "sdpa_cudnn_graph": "#b9a3d6",
}
FALLBACK_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                    "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
                    "#31a354", "#756bb1", "#636363", "#e6550d"]
LINE_STYLES = ["-", "--", ":", "-."]  # one per variant (B, G, W ...) of a figure, in sorted order
PASS_TITLES = {"fwd": "forward", "fwdbwd": "forward + backward", "decode": "one decode step"}
FAMILY_TITLES = {
    "decode": "One NSA decode step vs full-attention decode",
    "nsa": "Whole nsa() (compression, top-n, branches) vs fla and full attention",
    "selected": "Selected-block attention vs fla and full attention",
    "sliding": "Sliding-window attention vs a flex_attention band and full attention",
    "profile_banded": "Banded kernels (sliding, compressed branch): tile variants",
}
# keys of a row that are not its config: the measurement and the measured extras (floats are too)
MEASURED = ("T", "provider", "pass", "ms", "tokens_read")
# config keys that say how a run was made (where it wrote, how it compiled), not what it measured
RUN_SETTINGS = ("out", "jobs", "compile_only")


def variant(row: dict) -> str:
    """The row's config beyond T, provider and pass ('B=16', 'G=4', ''): what tells its lines apart."""
    return " ".join(f"{k}={v}" for k, v in _variant_key(row))


def _variant_key(row: dict) -> tuple:
    return tuple((k, v) for k, v in sorted(row.items()) if k not in MEASURED and not isinstance(v, float))


def series(rows: list[dict]) -> dict:
    """The lines of a figure: {(pass, colour key, style key): sorted [(T, ms)]}. The colour key is the
    provider, the style key its variant (B, G, ...). A profile whose providers are all '<group> <name>'
    ('sliding r128s2') is drawn as one colour per name and one line style per group."""
    grouped = all(" " in r["provider"] for r in rows)
    lines: dict = {}
    for r in rows:
        name, style = r["provider"], _variant_key(r)
        if grouped:
            group, name = name.split(" ", 1)
            style = (("", group),) + style
        lines.setdefault((r["pass"], name, style), []).append((r["T"], r["ms"]))
    return {key: sorted(pts) for key, pts in lines.items()}


def ours_vs_peers(rows: list[dict], pass_: str) -> list[tuple]:
    """[(variant, T, ours ms, '1.23× faster than fla')] at the largest T that ours ran, per variant."""
    notes = []
    for var in sorted({_variant_key(r) for r in rows}):
        here = [r for r in rows if r["pass"] == pass_ and _variant_key(r) == var]
        ours = {r["T"]: r["ms"] for r in here if r["provider"] == "ours"}
        if not ours:
            continue
        T_max = max(ours)
        peers = {r["provider"]: r["ms"] for r in here if r["T"] == T_max and not r["provider"].startswith("ours")}
        if peers:
            notes.append((" ".join(f"{k}={v}" for k, v in var), T_max, ours[T_max], speedup_text(ours[T_max], peers)))
    return notes


def config_summary(config: dict, max_len: int = 50) -> str:
    """The config's short scalar entries, 'B=1, HQ=64, ...; ours: ...': a figure's subtitle."""
    short = {k: v for k, v in config.items() if k not in RUN_SETTINGS and isinstance(v, (int, float, str))
             and not isinstance(v, bool) and len(str(v)) <= max_len}
    values = [f"{k}={v}" for k, v in short.items() if " " not in str(v)]
    phrases = [f"{k}: {v}" for k, v in short.items() if " " in str(v)]  # 'ours: l = d = 64, window 0'
    return "; ".join([", ".join(values)] + phrases)


def speedup_text(ours_ms: float, peers: dict) -> str:
    """'1.23× faster than fla' (or slower) against the fastest of peers {name: ms}."""
    best = min(peers, key=peers.get)
    s = peers[best] / ours_ms
    return f"{s:.2f}× faster than {best}" if s >= 1 else f"{1 / s:.2f}× slower than {best}"


def plot_results(res: dict, path: str, family: str) -> None:
    """The figure of one results file {"device", "commit", "config", "rows"}: time against T on
    log-log axes, one panel per pass, one colour per provider (ours drawn boldest), one line style
    per variant (B, G, ...), the legend outside the panels and, at the largest T, ours' speed-up over
    the fastest peer. Same input, same bytes: no date or version in the PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    lines = series(rows)
    passes = list(dict.fromkeys(r["pass"] for r in rows))
    names = list(dict.fromkeys(name for _, name, _ in lines))
    styles = sorted({style for _, _, style in lines})
    unknown = [n for n in names if n not in PROVIDER_COLOURS]
    colour = dict(PROVIDER_COLOURS, **{n: FALLBACK_COLOURS[i % len(FALLBACK_COLOURS)] for i, n in enumerate(unknown)})
    scale, unit = (1e3, "µs") if max(r["ms"] for r in rows) < 1.0 else (1.0, "ms")  # decode steps read in µs

    fig, axes = plt.subplots(1, len(passes), figsize=(5.2 * len(passes) + 2.6, 4.8), squeeze=False, layout="constrained")
    handles = {}
    for ax, p in zip(axes[0], passes):
        for (pass_, name, style), pts in sorted(lines.items(), key=lambda kv: (names.index(kv[0][1]), kv[0][2])):
            if pass_ != p:
                continue
            ours = name.startswith("ours")
            label = " ".join(([v for k, v in style if not k] + [name] + [f"{k}={v}" for k, v in style if k])
                             if len(styles) > 1 else [name])
            (line,) = ax.plot([T for T, _ in pts], [ms * scale for _, ms in pts], color=colour[name],
                              linestyle=LINE_STYLES[styles.index(style) % len(LINE_STYLES)], marker="o",
                              markersize=4 if ours else 3, zorder=3 if ours else 2,
                              linewidth=3.0 if name == "ours" else 2.2 if ours else 1.3)
            handles.setdefault(label, line)
        _axes_style(ax, sorted({r["T"] for r in rows}), unit, p, len(passes) > 1)
        notes = ours_vs_peers(rows, p)  # a note names its variant only where there are several
        _speedup_notes(ax, notes if len(styles) > 1 else [("",) + n[1:] for n in notes], scale, colour["ours"])
    where = f"{res['device']}, commit {res.get('commit', '?')}; {config_summary(res.get('config', {}))}"
    fig.suptitle(FAMILY_TITLES.get(family, family) + "\n" + textwrap.fill(where, int(fig.get_figwidth() * 11)),
                 fontsize=10.5)
    keys = sorted({k or "group" for style in styles for k, _ in style})
    fig.legend(list(handles.values()), list(handles.keys()), loc="outside right center", fontsize=9, title_fontsize=9,
               title="provider" + (f" (line style: {', '.join(keys)})" if len(styles) > 1 else ""))
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def _axes_style(ax, Ts: list[int], unit: str, pass_: str, titled: bool) -> None:
    """Log-log axes with T in k tokens, plain numbers on the time axis, room on the right for notes."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(Ts, [f"{T // 1024}k" if T % 1024 == 0 else str(T) for T in Ts])
    ax.set_xlim(Ts[0] / 1.25, Ts[-1] * 3.0)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("T (tokens of context)" if pass_ == "decode" else "T (tokens)")
    ax.set_ylabel(f"{unit} per {'step' if pass_ == 'decode' else 'call'} (median)")
    if titled:
        ax.set_title(PASS_TITLES.get(pass_, pass_))
    ax.grid(True, which="both", alpha=0.3)


def _speedup_notes(ax, notes: list[tuple], scale: float, colour: str) -> None:
    """Each note right of ours' last point, joined to it by a line; notes of nearby lines are moved
    apart (in axes fractions) so that they do not overlap."""
    y0, y1 = (math.log(y) for y in ax.get_ylim())
    placed = []
    for var, T_max, ms, text in sorted(notes, key=lambda n: n[2]):
        frac = max([(math.log(ms * scale) - y0) / (y1 - y0)] + [f + 0.15 for f in placed[-1:]])
        placed.append(frac)
        ax.annotate((f"{var}: ours" if var else "ours") + "\n" + text.replace(" than", "\nthan"), (T_max, ms * scale),
                    xytext=(T_max * 1.12, frac), textcoords=("data", "axes fraction"), ha="left", va="center",
                    fontsize=8.5, color=colour, fontweight="bold", linespacing=1.1,
                    arrowprops=dict(arrowstyle="-", color=colour, linewidth=0.8, shrinkA=0, shrinkB=3))
