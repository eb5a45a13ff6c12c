"""The benchmark harness on the CPU (timer stubbed): row schema, failing peers skipped; the committed
benchmarks/README.md against its rendering; the figures."""
import glob
import os
import subprocess
import sys

import torch

import benchmarks.common as bc


def test_time_providers_rows_and_failures(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bc, "bench_ms", lambda fn, grad_to_none=None, rep=200: calls.append(fn()) or 1.5)
    x = torch.randn(4, 3, requires_grad=True)

    def broken():
        raise RuntimeError("this peer cannot run the shape")

    rows = bc.time_providers({"ours": (lambda: (x * 2).sum(-1), [x]), "peer": (broken, [])}, 1024, G=16)
    assert rows == [dict(T=1024, provider="ours", G=16, ms=1.5, **{"pass": "fwd"}),
                    dict(T=1024, provider="ours", G=16, ms=1.5, **{"pass": "fwdbwd"})]
    assert "peer failed at T=1024" in capsys.readouterr().out
    assert x.grad is not None  # the fwd+bwd closure really ran backward


def test_results_file_schema(tmp_path, monkeypatch):
    monkeypatch.setattr(bc, "HERE", str(tmp_path))
    path = bc.write_results("demo", "NVIDIA H100 80GB HBM3", {"B": 1}, [dict(T=8, provider="ours", ms=1.0, **{"pass": "fwd"})])
    import json

    data = json.load(open(path))
    assert path.endswith("results/h100/demo.json")
    assert set(data) == {"device", "commit", "config", "rows"} and data["rows"][0]["pass"] == "fwd"


def test_trace_decode_splits_and_labels_steps():
    import pytest

    from benchmarks.trace_decode import split_steps, summarize

    fill = "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<signed char>>"
    sleep = "at::cuda::(anonymous namespace)::spin_kernel(long)"
    ev = [(0.0, 1.0, "main_kernel")]  # before the first flush: not part of a step
    for t0 in (0.0, 500.0):  # a step: the flush, the sleep, three kernels
        ev += [(t0 + 1, t0 + 2, fill), (t0 + 2, t0 + 100, sleep), (t0 + 100, t0 + 104, "main_kernel"),
               (t0 + 104.5, t0 + 111, "main_kernel"), (t0 + 112, t0 + 115, "main_kernel")]
    ev.append((900.0, 901.0, "main_kernel"))  # a stray kernel joins the last step
    steps_ = split_steps(sorted(ev))
    assert [len(s) for s in steps_] == [3, 4]
    assert steps_[0] == [("main_kernel", 0.0, 4.0), ("main_kernel", 4.5, 6.5), ("main_kernel", 12.0, 3.0)]
    span, cols = summarize(steps_ + steps_[:1], ["compressed", "select+sparse", "combine"])
    assert span == pytest.approx(15.0)  # the three-kernel steps only (the most common count)
    assert cols == [("compressed", 0.0, 4.0), ("select+sparse", 4.5, 6.5), ("combine", 12.0, 3.0)]
    assert summarize(steps_[:1], ["a", "b"])[1][0][0] == "main_kernel"  # labels only when they fit


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def test_committed_readme_is_what_the_results_render():
    from benchmarks.run_all import load_results, render_readme

    with open(os.path.join(ROOT, "benchmarks", "README.md")) as f:
        committed = f.read()
    results = load_results(RESULTS)
    assert render_readme(results) == committed, "run `python benchmarks/run_all.py --update` and commit"
    current = results[0][2]["device"]
    assert f"## {current} (current)" in committed and "## History:" in committed  # the newest device first


def test_run_all_without_gpu_renders_elsewhere(tmp_path):
    """The default render (here --skip-run, so that a GPU machine does not start the benchmarks) writes
    its README and figures under --out and leaves every file of benchmarks/ as it was."""
    def snapshot():
        return {p: open(p, "rb").read() for p in glob.glob(os.path.join(ROOT, "benchmarks", "**", "*"), recursive=True)
                if os.path.isfile(p) and "__pycache__" not in p}

    before = snapshot()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run_all.py"), "--skip-run", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert snapshot() == before
    assert "is current" in res.stdout
    text = (tmp_path / "README.md").read_text()
    assert text == open(os.path.join(ROOT, "benchmarks", "README.md")).read()
    pngs = sorted(p.relative_to(tmp_path / "results").as_posix() for p in tmp_path.glob("results/*/*.png"))
    jsons = glob.glob(os.path.join(RESULTS, "*", "*.json"))
    assert pngs == sorted(os.path.relpath(p, RESULTS).replace(".json", ".png") for p in jsons)
    assert all(f"](results/{p})" in text for p in pngs)  # the README shows every figure


def test_figure_is_deterministic_and_annotated(tmp_path):
    res = {"device": "NVIDIA H200", "commit": "abc1234", "config": {"B": 1, "ours": "paper blocks, W = 512"},
           "rows": [dict(T=T, provider=p, B=B, ms=ms * T / 8192 * B, **{"pass": "decode"})
                    for T in (8192, 65536) for B in (1, 16) for p, ms in (("ours", 0.02), ("sdpa_cudnn", 0.05))]}
    bc.plot_results(res, str(tmp_path / "a.png"), "decode")
    bc.plot_results(res, str(tmp_path / "b.png"), "decode")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert bc.ours_vs_peers(res["rows"], "decode") == [("B=1", 65536, 0.16, "2.50× faster than sdpa_cudnn"),
                                                        ("B=16", 65536, 2.56, "2.50× faster than sdpa_cudnn")]
    assert bc.speedup_text(2.0, {"flex": 1.6, "sdpa": 9.0}) == "1.25× slower than flex"
    assert bc.config_summary(res["config"]) == "B=1; ours: paper blocks, W = 512"


def test_one_colour_per_provider_and_one_style_per_variant():
    rows = [dict(T=8192, provider=p, G=G, ms=1.0, **{"pass": "fwd"}) for p in ("ours", "fla") for G in (4, 16)]
    lines = bc.series(rows)
    assert set(lines) == {("fwd", p, (("G", G),)) for p in ("ours", "fla") for G in (4, 16)}
    profile = [dict(T=8192, provider=f"{b} {v}", ms=1.0, **{"pass": "fwd"}) for b in ("sliding", "compressed")
               for v in ("base", "r128")]
    assert set(bc.series(profile)) == {("fwd", v, (("", b),)) for b in ("sliding", "compressed") for v in ("base", "r128")}
    assert len(set(bc.PROVIDER_COLOURS.values())) == len(bc.PROVIDER_COLOURS)
