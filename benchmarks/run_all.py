"""Run every benchmark (GPU), then render benchmarks/results/<device>/*.json: one markdown table per
results file in benchmarks/README.md (the newest device first, earlier devices as history) and one
figure per file, results/<device>/<family>.png. The rendering is a pure function of the JSON.

    python benchmarks/run_all.py            # GPU: run the benchmarks, then render in place
    python benchmarks/run_all.py            # no GPU: render into a temporary folder, leaving the
                                            # checkout as it was, and say whether README.md is current
    python benchmarks/run_all.py --update   # render in place (README.md and the PNGs) from the JSON
    python benchmarks/run_all.py --check    # exit 1 when README.md is not what the JSON renders
"""
import argparse
import glob
import io
import json
import os
import subprocess
import sys
import tempfile
from contextlib import redirect_stdout

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import HERE, RUN_SETTINGS, plot_results, print_table, variant  # noqa: E402

# results/<device>/ folders, newest first: the first present is the current device, the rest history
DEVICES = ("h200", "h100")

HEADER = """# Benchmarks

Rendered by `python benchmarks/run_all.py --update` from the committed `results/<device>/*.json`
(each written by one `bench_*.py` run that timed every provider in the same process; medians of
`triton.testing.do_bench`); do not edit by hand. Providers: `ours` (this repository's TileLang
kernels), `fla` (fla-core's Triton `parallel_nsa`), `sdpa_flash` / `sdpa_cudnn` (PyTorch SDPA full
causal attention), others as each file's config says. Times in ms. Each figure marks, at the largest
T, how much faster (or slower) `ours` is than the fastest peer.
"""


def labelled(rows):
    """Provider names extended by the row's variant (G, W, B, ...) so that tables stay unambiguous."""
    return [dict(T=r["T"], provider=" ".join(filter(None, [r["provider"], variant(r)])), ms=r["ms"],
                 **{"pass": r["pass"]}) for r in rows]


def load_results(results_dir):
    """[(device folder, family, results dict)]: the devices in DEVICES order (others after them, by
    name), the families of a device by name."""
    found = {}
    for path in sorted(glob.glob(os.path.join(results_dir, "*", "*.json"))):
        with open(path) as f:
            res = json.load(f)
        found.setdefault(os.path.basename(os.path.dirname(path)), []).append(
            (os.path.splitext(os.path.basename(path))[0], res))
    order = [d for d in DEVICES if d in found] + sorted(d for d in found if d not in DEVICES)
    return [(d, family, res) for d in order for family, res in found[d]]


def config_text(config, max_len=160):
    """The config as 'k=v, ...'; a value too long to read in a line (a profile's checks) stays in the JSON."""
    return ", ".join(f"{k}={v}" if len(str(v)) <= max_len else f"{k}=(in the JSON)"
                     for k, v in config.items() if k not in RUN_SETTINGS)


def render_readme(results):
    """benchmarks/README.md's text for load_results(...)'s list."""
    sections = [HEADER]
    devices = list(dict.fromkeys(d for d, _, _ in results))
    for i, device in enumerate(devices):
        files = [(family, res) for d, family, res in results if d == device]
        name = files[0][1]["device"]
        if i == 0:
            sections.append(f"## {name} (current)\n")
        else:
            newer = {family for d, family, _ in results if d in devices[:i]}
            only = [family for family, _ in files if family not in newer]
            sections.append(f"## History: {name}\n\nEarlier runs, kept for comparison"
                            + (f"; not yet rerun on a newer device: {', '.join(only)}" if only else "") + ".\n")
        for family, res in files:
            buf = io.StringIO()
            with redirect_stdout(buf):
                print_table(labelled(res["rows"]))
            sections.append(f"### {family} — {name} (commit {res.get('commit', '?')})\n\n"
                            f"Config: {config_text(res.get('config', {}))}\n\n{buf.getvalue().strip()}\n\n"
                            f"![{family} on {name}](results/{device}/{family}.png)\n")
    return "\n".join(sections)


def render(results, readme_path, figures_dir):
    """Write the README to readme_path and each figure to figures_dir/<device>/<family>.png."""
    for device, family, res in results:
        os.makedirs(os.path.join(figures_dir, device), exist_ok=True)
        fig = os.path.join(figures_dir, device, f"{family}.png")
        plot_results(res, fig, family)
        print(f"rendered {device}/{family} ({res['device']}): {len(res['rows'])} rows -> {fig}")
    with open(readme_path, "w") as f:
        f.write(render_readme(results))
    print(f"wrote {readme_path}")


def run_benchmarks():
    for script in sorted(glob.glob(os.path.join(HERE, "bench_*.py"))):
        print(f"== {os.path.basename(script)}", flush=True)
        rc = subprocess.call([sys.executable, script])
        if rc:
            print(f"   {os.path.basename(script)} exited with {rc}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-run", action="store_true", help="do not run the benchmarks, even on a GPU")
    ap.add_argument("--update", action="store_true", help="write README.md (beside --results) and the PNGs in place")
    ap.add_argument("--check", action="store_true", help="only compare README.md with its rendering")
    ap.add_argument("--results", default=os.path.join(HERE, "results"), help="results/<device>/*.json to render")
    ap.add_argument("--out", help="where a render that is not --update goes (default: a new temporary folder)")
    args = ap.parse_args()
    readme = os.path.join(os.path.dirname(os.path.abspath(args.results)), "README.md")  # beside results/
    ran = False
    if not (args.skip_run or args.check):
        try:
            import torch

            has_gpu = torch.cuda.is_available()
        except ImportError:
            has_gpu = False
        if has_gpu:
            run_benchmarks()
            ran = True  # the benchmarks rewrote results/: render in place
        else:
            print("no CUDA device: rendering the committed results only")

    results = load_results(args.results)
    with open(readme) as f:
        current = f.read() == render_readme(results)
    if args.check:
        print(f"{readme} is " + ("what the results render" if current else
                                  "NOT what the results render: run benchmarks/run_all.py --update"))
        sys.exit(0 if current else 1)
    if args.update or ran:
        render(results, readme, args.results)
        return
    out = args.out or tempfile.mkdtemp(prefix="nsa-benchmarks-")
    render(results, os.path.join(out, "README.md"), os.path.join(out, "results"))
    print(f"{readme} is " + ("current" if current else "out of date: --update writes it in place"))


if __name__ == "__main__":
    main()
