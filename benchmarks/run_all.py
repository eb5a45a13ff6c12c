"""Run every benchmark (GPU), then collect benchmarks/results/<device>/*.json into one markdown
table per family, written into benchmarks/README.md, and one overview figure per family. Without a
GPU it says so and renders the committed results.

    python benchmarks/run_all.py [--skip-run]
"""
import argparse
import glob
import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import HERE, plot, print_table  # noqa: E402

HEADER = """# Benchmarks

Made by `python benchmarks/run_all.py` from the committed `results/<device>/*.json` (each written by
one `bench_*.py` run that timed every provider in the same process; medians of
`triton.testing.do_bench`). Providers: `ours` (this repository's TileLang kernels), `fla`
(fla-core's Triton `parallel_nsa`), `sdpa_flash` / `sdpa_cudnn` (PyTorch SDPA full causal
attention), others as each file's config says. Times in ms.
"""


def labelled(rows):
    """Provider names extended by the row's extra keys (G, W, ...) so that tables stay unambiguous."""
    out = []
    for r in rows:
        # config keys only (G, W, B); measured extras (tokens_read, kv_GBps) stay in the JSON
        extra = {k: v for k, v in r.items()
                 if k not in ("T", "provider", "pass", "ms", "tokens_read") and not isinstance(v, float)}
        name = r["provider"] + "".join(f" {k}={v}" for k, v in sorted(extra.items()))
        out.append(dict(T=r["T"], provider=name, ms=r["ms"], **{"pass": r["pass"]}))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-run", action="store_true", help="only render the committed results")
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="results/<device>/*.json to render")
    ap.add_argument("--readme", default=os.path.join(HERE, "README.md"), help="where the tables go")
    args = ap.parse_args()
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if args.skip_run:
        pass
    elif not has_gpu:
        print("no CUDA device: rendering the committed results only")
    else:
        for script in sorted(glob.glob(os.path.join(HERE, "bench_*.py"))):
            print(f"== {os.path.basename(script)}", flush=True)
            rc = subprocess.call([sys.executable, script])
            if rc:
                print(f"   {os.path.basename(script)} exited with {rc}", flush=True)

    sections = [HEADER]
    for path in sorted(glob.glob(os.path.join(args.results, "*", "*.json"))):
        with open(path) as f:
            res = json.load(f)
        family = os.path.splitext(os.path.basename(path))[0]
        device_dir = os.path.basename(os.path.dirname(path))
        rows = labelled(res["rows"])
        buf = io.StringIO()
        with redirect_stdout(buf):
            print_table(rows)
        fig = os.path.join(os.path.dirname(path), f"{family}_overview.png")
        plot(rows, fig, family)
        config = ", ".join(f"{k}={v}" for k, v in res.get("config", {}).items())
        sections.append(f"## {family} — {res['device']} (commit {res.get('commit', '?')})\n\n"
                        f"Config: {config}\n\n{buf.getvalue().strip()}\n\n"
                        f"![{family}](results/{device_dir}/{family}_overview.png)\n")
        print(f"rendered {family} ({res['device']}): {len(res['rows'])} rows -> {fig}")
    with open(args.readme, "w") as f:
        f.write("\n".join(sections))
    print(f"wrote {args.readme}")


if __name__ == "__main__":
    main()
