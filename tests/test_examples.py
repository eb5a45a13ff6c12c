"""Each example runs with its smallest settings on the CPU and writes its figures."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, out):
    res = subprocess.run([sys.executable, os.path.join(ROOT, script), "--out", str(out), *args],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_visualize_selection(tmp_path):
    out = run("examples/02_visualize_selection.py", "--T", "256", out=tmp_path)
    for name in ("selection_maps.png", "selection_distance.png", "gate_histograms.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    assert "selection blocks" in out


def test_needle_in_a_haystack_smallest(tmp_path):
    out = run("examples/03_needle_in_a_haystack.py", "--train-len", "64", "--test-lens", "64", "128",
              "--depths", "0.2", "0.8", "--steps", "3", "--batch", "4", out=tmp_path)
    assert (tmp_path / "needle_accuracy.png").exists()
    assert "accuracy (rows: depth, columns: length)" in out


def test_train_toy_lm_smallest(tmp_path):
    out = run("examples/04_train_toy_lm.py", "--steps", "4", "--T", "48", "--batch", "2", out=tmp_path)
    assert (tmp_path / "toy_lm_loss.png").exists()
    assert "nsa: loss" in out and "full: loss" in out


def test_decode_smallest(tmp_path):
    out = run("examples/05_decode.py", "--prompt", "40", "--steps", "12", "--batch", "2", out=tmp_path)
    assert (tmp_path / "decode_reads.png").exists()
    assert "cached generation equals the full forward's predictions: True" in out


def test_run_all_renders_committed_results(tmp_path):
    results = os.path.join(ROOT, "benchmarks", "results")
    if not any(f.endswith(".json") for _, _, fs in os.walk(results) for f in fs):
        pytest.skip("no committed results")
    shutil.copytree(results, tmp_path / "results")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run_all.py"), "--skip-run",
                          "--results", str(tmp_path / "results"), "--readme", str(tmp_path / "README.md")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    text = (tmp_path / "README.md").read_text()
    assert "| T |" in text and "ours" in text
    assert list((tmp_path / "results").glob("*/*_overview.png"))
