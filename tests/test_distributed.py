"""Context-parallel NSA (nsa_module/distributed.py) on gloo processes, CPU, the reference path.

One start of WORLD processes serves every check: groups of 1, 2, 3 and 4 ranks (subgroups that do
not start at rank 0, so a group's ranks and the world's differ), both layouts, two configurations,
then the bad inputs, then one good run more (the bad ones must leave the collectives in step). The
workers only compute and save; this process compares each rank's output and gradient shards,
unsharded, with one process's reference NSA on the whole sequence. Bounded in time: every
collective times out (TIMEOUT_S) and the workers are joined with a deadline, then killed.
"""
from __future__ import annotations

import datetime
import os
import pathlib
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import reference as R
from nsa_module.distributed import shard_ranges, shard_sequence, unshard_sequence
from reference.inputs import random_gates, random_qkv
from tests.utils import assert_same_math

WORLD = 4
GROUPS = {1: [0], 2: [2, 3], 3: [1, 2, 3], 4: [0, 1, 2, 3]}  # world ranks of the group of each size
TIMEOUT_S = 60  # any collective
DEADLINE_S = 300  # the whole spawn (the machine may be shared)

CONFIGS = {
    # the paper's l, d, l', n, W; T > n·l' (a real top-n choice), a multiple of 24 (zigzag over 2, 3 and
    # 4 ranks) and of none of l, d, l': compression and selection blocks straddle the ranks' chunks
    "paper": dict(B=1, T=1032, HQ=4, H=1, K=16, V=16, l=32, d=16, l_sel=64, n=16, W=512),
    # G = 1, K != V, B = 2, a stride (5) that divides neither T nor the chunks
    "small-G1-KneV": dict(B=2, T=168, HQ=2, H=2, K=8, V=12, l=10, d=5, l_sel=20, n=4, W=15),
    # no sliding branch, no gates (None: 1)
    "small-W0-no-gates": dict(B=1, T=96, HQ=4, H=2, K=8, V=8, l=10, d=5, l_sel=20, n=3, W=0, gates=False),
}
LAYOUTS = ("contiguous", "zigzag")
RUNS = [(P, layout, cfg) for P in (2, 3, 4) for layout in LAYOUTS for cfg in ("paper", "small-G1-KneV")]
RUNS += [(3, layout, "small-W0-no-gates") for layout in LAYOUTS]
RUNS += [(1, layout, "small-G1-KneV") for layout in LAYOUTS]  # the paper's at P = 1 would be the reference itself

# the layer with cp_group (compression "mlp", K != V), on the whole world
LAYER = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, v_head_dim=12, compress_block=12,
             compress_stride=4, block_size=16, block_counts=4, window_size=16)
LAYER_T, LAYER_LAYOUT = 104, "zigzag"


def _inputs(cfg: dict, seed: int = 0):
    """q, k, v, the three gates and a dO, float64, the whole sequence."""
    c = cfg
    q, k, v = random_qkv(c["B"], c["T"], c["HQ"], c["H"], c["K"], c["V"], dtype=torch.float64, seed=seed)
    gates = [random_gates(c["B"], c["T"], c["HQ"], torch.float64, seed=seed + 1 + i) if c.get("gates", True) else None
             for i in range(3)]
    do = torch.randn(c["B"], c["T"], c["HQ"], c["V"], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return [q, k, v, *gates], do


def _cp_kwargs(cfg: dict) -> dict:
    return dict(block_counts=cfg["n"], block_size=cfg["l_sel"], window_size=cfg["W"], compress_block=cfg["l"],
                compress_stride=cfg["d"])


def _layer(seed: int = 0, cp_group=None):
    from nsa_module import NativeSparseAttention
    torch.manual_seed(seed)
    kw = {} if cp_group is None else dict(cp_group=cp_group, cp_layout=LAYER_LAYOUT)
    return NativeSparseAttention(**LAYER, **kw).double()


def _layer_inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, LAYER_T, LAYER["hidden_size"], dtype=torch.float64, generator=g)
    return x, torch.randn(x.shape, dtype=torch.float64, generator=g)


# ------------------------------------------------------------------------------------------------
# the worker (runs in each spawned process)
# ------------------------------------------------------------------------------------------------

def _run_cp(tensors, do, cfg, group, P, rank, layout, **over):
    """This rank's output and the gradients of its shards of (q, k, v, gates)."""
    from nsa_module.distributed import context_parallel_nsa
    leaves = [None if x is None else shard_sequence(x, rank, P, layout).clone().requires_grad_() for x in tensors]
    o = context_parallel_nsa(*leaves, group=group, layout=layout, **{**_cp_kwargs(cfg), **over})
    o.backward(shard_sequence(do, rank, P, layout))
    return [o.detach()] + [None if x is None else x.grad for x in leaves]


def _bad_cases(cfg, tensors, do, rank, world):
    """(name, call) of each bad input, every rank calling; some ranks differ on purpose."""
    from nsa_module.distributed import context_parallel_nsa
    kw = _cp_kwargs(cfg)
    shards = [shard_sequence(x, rank, world, "zigzag") for x in tensors]
    q, k, v, *g = shards
    contiguous = [shard_sequence(x, rank, world, "contiguous") for x in tensors]

    def call(*args, layout="zigzag", **over):
        return lambda: context_parallel_nsa(*args, group=None, layout=layout, **{**kw, **over})
    short = [x[:, :-2] if rank == 3 else x for x in shards]
    odd = [x[:, :-1] for x in contiguous]
    bad_gate = [g[0][:, :, :1] if rank == 2 else g[0], g[1], g[2]]
    k_grad = k.clone().requires_grad_(rank != 0)
    return [
        ("shard length", call(*short)),
        ("config", call(*shards, window_size=kw["window_size"] + (rank == 1))),
        ("zigzag odd shard", call(*odd)),
        ("layout", call(*shards, layout="ring")),
        ("one rank's gate", call(q, k, v, *bad_gate)),
        ("gradients on some ranks", call(q, k_grad, v, *g)),
    ]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    results = {}
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=TIMEOUT_S))
        groups = {P: dist.new_group(ranks) for P, ranks in GROUPS.items()}  # every rank creates every group
        data = {name: _inputs(cfg) for name, cfg in CONFIGS.items()}
        for P, layout, name in RUNS:
            if rank in GROUPS[P]:
                tensors, do = data[name]
                g_rank = dist.get_rank(groups[P])
                results[(P, layout, name)] = _run_cp(tensors, do, CONFIGS[name], groups[P], P, g_rank, layout)
        # the layer: the same weights on every rank (one seed), x sharded; parameter gradients summed
        # over the group as data parallelism over dp × cp would
        x, dy = _layer_inputs()
        layer = _layer(cp_group=groups[world])
        xs = shard_sequence(x, rank, world, LAYER_LAYOUT).requires_grad_()
        y, _ = layer(xs)
        y.backward(shard_sequence(dy, rank, world, LAYER_LAYOUT))
        for p in layer.parameters():
            dist.all_reduce(p.grad, group=groups[world])
        results["layer"] = [y.detach(), xs.grad, {n: p.grad for n, p in layer.named_parameters()}]
        if rank == 0:  # a group of one: the layer's usual path
            xl = x.clone().requires_grad_()
            layer = _layer(cp_group=groups[1])
            y, _ = layer(xl)
            y.backward(dy)
            results["layer1"] = [y.detach(), xl.grad, {n: p.grad for n, p in layer.named_parameters()}]
        # bad input: every rank must raise, none may hang
        tensors, do = data["small-G1-KneV"]
        for name, fn in _bad_cases(CONFIGS["small-G1-KneV"], tensors, do, rank, world):
            try:
                fn()
                results[("bad", name)] = None
            except Exception as e:  # noqa: BLE001  recorded for the parent to judge
                results[("bad", name)] = (type(e).__name__, str(e))
        # and the collectives are still in step
        results["after"] = _run_cp(tensors, do, CONFIGS["small-G1-KneV"], groups[world], world, rank, "zigzag")
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        results["crash"] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


# ------------------------------------------------------------------------------------------------
# the spawn (once for the module) and the single-process references
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{rank: results} of the WORLD workers."""
    tmp = tmp_path_factory.mktemp("cp")
    root = str(pathlib.Path(__file__).resolve().parents[1])
    # forkserver: a fresh interpreter (as spawn: no fork of this process and its threads) that imports
    # this module once, torch and TileLang included (~5 s), then forks the workers from itself
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.test_distributed"])
    with pytest.MonkeyPatch.context() as mpatch:  # the workers import this checkout, not an installed copy
        mpatch.setenv("PYTHONPATH", root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        procs = [ctx.Process(target=_worker, args=(r, WORLD, str(tmp / "init"), str(tmp)), daemon=True)
                 for r in range(WORLD)]
        for p in procs:
            p.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=DEADLINE_S)
    for p in procs:
        p.join(max(0.0, (deadline - datetime.datetime.now()).total_seconds()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join(5)
    assert not hung, f"ranks {hung} still running after {DEADLINE_S} s (a hang): killed"
    out = {}
    for r in range(WORLD):
        f = tmp / f"rank{r}.pt"
        assert f.exists(), f"rank {r} left no results (exit code {procs[r].exitcode})"
        out[r] = torch.load(f, weights_only=False)
        assert "crash" not in out[r], f"rank {r} crashed:\n{out[r]['crash']}"
    return out


_REFS = {}


def _reference(name: str):
    """[o, dq, dk, dv, dg_cmp, dg_slc, dg_swa] of reference.naive_nsa_full on the whole sequence."""
    if name not in _REFS:
        cfg = CONFIGS[name]
        tensors, do = _inputs(cfg)
        leaves = [None if x is None else x.clone().requires_grad_() for x in tensors]
        o, _ = R.naive_nsa_full(*leaves, **_cp_kwargs(cfg))
        o.backward(do)
        _REFS[name] = [o.detach()] + [None if x is None else x.grad for x in leaves]
    return _REFS[name]


NAMES = ("o", "dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_swa")


@pytest.mark.parametrize("P,layout,name", RUNS, ids=[f"P{P}-{lay}-{name}" for P, lay, name in RUNS])
def test_context_parallel_equals_one_process(runs, P, layout, name):
    """Every rank's output and gradient shards, put back together, equal the whole sequence's."""
    ref = _reference(name)
    shards = [runs[w][(P, layout, name)] for w in GROUPS[P]]  # in group-rank order
    for i, tname in enumerate(NAMES):
        if ref[i] is None:  # a gate not given
            assert all(s[i] is None for s in shards)
            continue
        for g_rank, s in enumerate(shards):
            assert_same_math(f"rank {g_rank} of {P}: {tname}", s[i], shard_sequence(ref[i], g_rank, P, layout))
        assert_same_math(f"{tname} unsharded", unshard_sequence([s[i] for s in shards], layout), ref[i])


BAD = {
    "shard length": (ValueError, "disagree on the shard length T/P \\(" + ", ".join(
        f"rank {r}: {CONFIGS['small-G1-KneV']['T'] // WORLD - 2 * (r == 3)}" for r in range(WORLD)) + "\\)"),
    "config": (ValueError, "disagree on the window_size"),
    "zigzag odd shard": (ValueError, "must be even"),
    "layout": (ValueError, "layout must be one of"),
    "one rank's gate": (ValueError, None),  # rank 2: its own error; the others name rank 2
    "gradients on some ranks": (ValueError, "disagree on whether k/v need gradients"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_on_every_rank(runs, case):
    import re
    exc, msg = BAD[case]
    for r in range(WORLD):
        got = runs[r][("bad", case)]
        assert got is not None, f"rank {r} did not raise for {case}"
        want = msg if msg is not None else ("g_cmp must have shape" if r == 2 else "rank\\(s\\) \\[2\\] of the group rejected")
        assert got[0] == exc.__name__ and re.search(want, got[1]), f"rank {r}: {got}"


def test_collectives_stay_in_step_after_bad_input(runs):
    ref = _reference("small-G1-KneV")
    for i, tname in enumerate(NAMES):
        got = unshard_sequence([runs[r]["after"][i] for r in range(WORLD)], "zigzag")
        assert_same_math(f"{tname} after the bad inputs", got, ref[i])


def test_layer_with_cp_group_equals_the_layer(runs):
    """NativeSparseAttention(cp_group=...) on shards of x: the output and dx shards, and the parameters'
    gradients summed over the group, equal one process's layer on the whole x."""
    x, dy = _layer_inputs()
    layer = _layer()
    xl = x.clone().requires_grad_()
    y, _ = layer(xl)
    y.backward(dy)
    got_y = unshard_sequence([runs[r]["layer"][0] for r in range(WORLD)], LAYER_LAYOUT)
    got_dx = unshard_sequence([runs[r]["layer"][1] for r in range(WORLD)], LAYER_LAYOUT)
    assert_same_math("y", got_y, y.detach())
    assert_same_math("dx", got_dx, xl.grad)
    # phi's position embedding shifts every compressed key alike, which the softmax ignores: its
    # gradient is 0 but for rounding at the scale of the other gradients
    atol = 1e-10 * max(p.grad.abs().max().item() for p in layer.parameters())
    for n, p in layer.named_parameters():
        for r in range(WORLD):
            assert_same_math(f"rank {r}: d{n}", runs[r]["layer"][2][n], p.grad, atol=atol)
    y1, dx1, dp1 = runs[0]["layer1"]  # cp_group of one rank
    assert torch.equal(y1, y.detach())
    assert_same_math("group of one: dx", dx1, xl.grad)
    for n, p in layer.named_parameters():
        assert_same_math(f"group of one: d{n}", dp1[n], p.grad, atol=atol)


# ------------------------------------------------------------------------------------------------
# in this process
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_and_unshard(layout, world):
    T = 2 * world * 5
    x = torch.arange(2 * T).view(2, T)
    shards = [shard_sequence(x, r, world, layout) for r in range(world)]
    assert torch.equal(unshard_sequence(shards, layout), x)
    covered = sorted(t for r in range(world) for s, e in shard_ranges(T, r, world, layout) for t in range(s, e))
    assert covered == list(range(T))
    if layout == "zigzag":  # rank r: chunks r and 2P-1-r, equal causal work
        assert shard_ranges(T, 0, world, layout) == [(0, 5), ((2 * world - 1) * 5, 2 * world * 5)]
    x3 = torch.arange(T * 3).view(1, T, 3)
    assert torch.equal(unshard_sequence([shard_sequence(x3, r, world, layout, dim=1) for r in range(world)], layout), x3)


def test_shard_errors():
    with pytest.raises(ValueError, match="multiple of 6"):
        shard_sequence(torch.zeros(1, 20), 0, 3, "zigzag")
    with pytest.raises(ValueError, match="multiple of 3"):
        shard_sequence(torch.zeros(1, 20), 0, 3, "contiguous")
    with pytest.raises(ValueError, match="layout must be one of"):
        shard_ranges(12, 0, 2, "ring")
    with pytest.raises(ValueError, match="rank must lie"):
        shard_ranges(12, 2, 2, "zigzag")
    with pytest.raises(ValueError, match="same length"):
        unshard_sequence([torch.zeros(1, 4), torch.zeros(1, 6)], "zigzag")


def test_needs_an_initialized_process_group():
    from nsa_module.distributed import context_parallel_nsa
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    q, k, v = random_qkv(1, 8, 2, 1, 4, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel_nsa(q, k, v, group=None)


def _one_rank_world(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init1'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_group_of_one_is_nsa(tmp_path, device):
    """One rank: no collective; the reference on the CPU, nsa() on the kernels (the same call)."""
    from nsa_module import context_parallel_nsa, nsa
    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    cfg = CONFIGS["small-G1-KneV"] if device == "cpu" else dict(CONFIGS["paper"], HQ=16, H=1, K=64, V=64)
    dtype = torch.float64 if device == "cpu" else torch.bfloat16
    tensors, do = _inputs(cfg)
    tensors = [x.to(device, dtype) for x in tensors]
    _one_rank_world(tmp_path)
    try:
        leaves = [x.clone().requires_grad_() for x in tensors]
        o = context_parallel_nsa(*leaves, group=None, layout="zigzag", **_cp_kwargs(cfg))
        o.backward(do.to(device, dtype))
        with pytest.raises(ValueError, match="layout must be one of"):
            context_parallel_nsa(*tensors, group=None, layout="ring", **_cp_kwargs(cfg))
    finally:
        dist.destroy_process_group()
    ref_leaves = [x.clone().requires_grad_() for x in tensors]
    if device == "cpu":
        ref = R.naive_nsa_full(*ref_leaves, **_cp_kwargs(cfg))[0]
    else:
        ref = nsa(*ref_leaves, **_cp_kwargs(cfg))
    assert torch.equal(o, ref)
    ref.backward(do.to(device, dtype))
    for name, x, r in zip(NAMES[1:], leaves, ref_leaves):
        if device == "cpu":
            assert_same_math(name, x.grad, r.grad)
        else:  # the kernels' dK/dV add with atomics: equal up to the order of those additions
            assert (x.grad.float() - r.grad.float()).norm() <= 1e-2 * r.grad.float().norm(), name
