"""Each example runs with its smallest settings on the CPU and writes its figures."""
import os
import subprocess
import sys

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

