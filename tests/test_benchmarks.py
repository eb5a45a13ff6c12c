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
