"""The benchmark harness on the CPU (timer stubbed): row schema, failing peers skipped."""
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
