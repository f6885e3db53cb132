"""The baseline modules (omnimoe.Dense, GShard, DeepSeekMoE, PKM, PEER; the library's
include/omnimoe/baselines.hpp) against a float64 pure-PyTorch reference written here from the
formulas of baselines.hpp alone: forward and routing on the CPU (float64, float32, bfloat16),
forward_routed, the gradients (gradcheck in float64; autograd of the reference on the same
routing, over several backward chunks; double backward refused), state_dict, dtype and
device moves, argument errors, opcheck of omnimoe::baseline_forward, torch.compile (with
gradients), and the CUDA backend (forward and gradients in float32, bfloat16; skipped without
a GPU)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import omnimoe
from omnimoe import _baseline_backward as bbw
from conftest import assert_close, check_current_stream_and_graph_capture

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="no CUDA device")

PARAMS = omnimoe.baselines.BASELINE_PARAMS  # the op's order of the BaselineParams fields


@dataclasses.dataclass(frozen=True)
class BCase:
    name: str
    cls: type
    args: tuple
    kwargs: tuple = ()
    hidden: int = 0

    def __str__(self):
        return self.name

    def make(self, **kw):
        return self.cls(*self.args, **dict(self.kwargs), **kw)

    @property
    def routed(self):
        return self.cls is not omnimoe.Dense


CASES = [
    BCase("dense", omnimoe.Dense, (16, 24), hidden=16),
    # GShard / DeepSeekMoE on CUDA need H and the expert width to be multiples of 8.
    BCase("gshard", omnimoe.GShard, (16, 8, 6, 2), hidden=16),
    BCase("gshard-k-equals-n", omnimoe.GShard, (8, 8, 3, 3), hidden=8),
    BCase("deepseekmoe", omnimoe.DeepSeekMoE, (16, 8, 6, 2), (("shared_width", 10),), hidden=16),
    BCase("deepseekmoe-no-shared", omnimoe.DeepSeekMoE, (8, 16, 5, 3), hidden=8),
    BCase("pkm", omnimoe.PKM, (16, (4, 6), 5), hidden=16),
    BCase("pkm-square", omnimoe.PKM, (12, 16, 4), hidden=12),
    BCase("peer", omnimoe.PEER, (16, (5, 3), 4), hidden=16),
    BCase("peer-k-equals-n", omnimoe.PEER, (8, (2, 3), 6), hidden=8),
]
ROUTED = [c for c in CASES if c.routed]

EXPECTED_PARAMS = {
    "dense": {"gate", "up", "down"},
    "gshard": {"router", "expert_gate", "expert_up", "expert_down"},
    "deepseekmoe": {"router", "expert_gate", "expert_up", "expert_down", "gate", "up", "down"},
    "deepseekmoe-no-shared": {"router", "expert_gate", "expert_up", "expert_down"},
    "pkm": {"query", "keys_row", "keys_col", "values"},
    "peer": {"query", "keys_row", "keys_col", "expert_in", "expert_out"},
}

# Relative tolerances of y by storage dtype (the library computes in float64 for float64,
# else float32; bfloat16 rounds y).
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}
CUDA_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def make(case, dtype=torch.float32, device="cpu", seed=0):
    """The module of `case` with fresh random parameters (wider than the default init, so that
    the router scores are well apart and every branch matters)."""
    g = torch.Generator().manual_seed(seed)
    m = case.make()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return m.to(device=device, dtype=dtype)


def random_x(case, tokens=(3, 5), dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*tokens, case.hidden, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def entries(m):
    return {n: getattr(m, n, None) for n in PARAMS}


# ---- the reference (include/omnimoe/baselines.hpp), float64 --------------------------------


def swiglu(x, gate, up, down):
    return (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()


def top_k(scores, K):
    """The K best per row, by descending score then ascending id (a stable sort)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :K]


def reference_params(m):
    return {n: t.detach().double().cpu() for n, t in entries(m).items() if t is not None}


def reference_scores(m, x, q_dtype=None, params=None):
    """Router scores [T, N] whose top-K is the routing: softmax probabilities (gshard,
    deepseekmoe) or s1[i] + s2[j] at e = i * Nc + j (pkm, peer). `q_dtype` rounds the query
    q to that dtype, as the CUDA backend stores it (in the layer's dtype). `params`: as in
    reference."""
    p = reference_params(m) if params is None else params
    if m.kind in ("gshard", "deepseekmoe"):
        return torch.softmax(x @ p["router"].t(), dim=-1)
    H = m.hidden_size
    q = x @ p["query"].t()
    if q_dtype is not None:
        q = q.to(q_dtype).double()
    s1 = q[:, : H // 2] @ p["keys_row"].t()
    s2 = q[:, H // 2:] @ p["keys_col"].t()
    return (s1[:, :, None] + s2[:, None, :]).reshape(x.shape[0], -1)


def reference(m, x, ids=None, gates=None, q_dtype=None, params=None):
    """(y [T, H], ids [T, K]) of module m for x [T, H], all in float64 on the CPU. `ids`
    imposes the experts (the gates then follow from the scores, as the layer computes them);
    `ids` and `gates` together are forward_routed (the gates used as given). `params` (name ->
    float64 CPU tensor) replaces the module's parameters: with it, and x and gates float64 CPU
    tensors, y is differentiable (reference_grads)."""
    x = x.detach().double().cpu() if params is None else x
    p = reference_params(m) if params is None else params
    T, H = x.shape
    if m.kind == "dense":
        return swiglu(x, p["gate"], p["up"], p["down"]), torch.empty(T, 0, dtype=torch.int64)
    K = m.top_k
    if gates is None:
        S = reference_scores(m, x, q_dtype, params)
        if ids is None:
            ids = top_k(S, K)
        chosen = torch.gather(S, 1, ids.long())
        if m.kind == "gshard":
            gates = chosen / chosen.sum(-1, keepdim=True)
        elif m.kind == "deepseekmoe":
            gates = chosen
        else:
            gates = torch.softmax(chosen, dim=-1)
    ids = ids.long().cpu()
    gates = gates.double().cpu() if params is None else gates
    if m.kind in ("gshard", "deepseekmoe"):
        N, W = m.num_experts, m.expert_width
        g = p["expert_gate"].view(N, W, H)[ids]  # [T, K, W, H]
        u = p["expert_up"].view(N, W, H)[ids]
        d = p["expert_down"].view(N, H, W)[ids]  # [T, K, H, W]
        h = F.silu(torch.einsum("th,tkwh->tkw", x, g)) * torch.einsum("th,tkwh->tkw", x, u)
        out = torch.einsum("tkw,tkhw->tkh", h, d)
        y = (gates[..., None] * out).sum(1)
        if "gate" in p:
            y = y + swiglu(x, p["gate"], p["up"], p["down"])
        return y, ids
    if m.kind == "pkm":
        return torch.einsum("tk,tkh->th", gates, p["values"][ids]), ids
    a = F.gelu(torch.einsum("th,tkh->tk", x, p["expert_in"][ids]))  # exact (erf) GELU
    return torch.einsum("tk,tkh->th", gates * a, p["expert_out"][ids]), ids


def reference_grads(m, x, ids, grad_y, gates=None):
    """{'x', parameter names, 'gates' (given gates)}: the gradients of <reference(m, x, ids,
    gates), grad_y> in float64 on the CPU, on the routing `ids` [T, K] (None for dense; with
    `gates`, forward_routed). Zeros for a parameter the layer does not use."""
    p = {n: t.detach().double().cpu().requires_grad_(True) for n, t in entries(m).items() if t is not None}
    xd = x.detach().double().cpu().reshape(-1, m.hidden_size).requires_grad_(True)
    gd = None if gates is None else gates.detach().double().cpu().reshape(ids.shape).requires_grad_(True)
    ids = None if ids is None else ids.cpu()
    y, _ = reference(m, xd, ids=ids, gates=gd, params=p)
    leaves = {"x": xd, **p, **({"gates": gd} if gd is not None else {})}
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y.detach().double().cpu().reshape(y.shape),
                                allow_unused=True)
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(leaves.items(), grads)}


def op_grads(layer, m, x, grad_y, ids=None, gates=None):
    """({'x', parameter names, 'gates'}: gradients, expert ids [T, K]) of <layer(x), grad_y>,
    `layer` being module m (or a compiled m); with `ids` and `gates`, of m.forward_routed (or
    of `layer` called as forward_routed). None where no gradient reached the tensor."""
    m.zero_grad(set_to_none=True)
    xg = x.detach().clone().requires_grad_(True)
    if ids is None:
        y, used = layer(xg, return_expert_ids=True)
    else:
        gates = gates.detach().clone().requires_grad_(True)
        y, used = layer(xg, ids, gates), ids
    y.backward(grad_y)
    grads = {"x": xg.grad, **{n: t.grad for n, t in m.named_parameters()}}
    if gates is not None:
        grads["gates"] = gates.grad
    return grads, used.reshape(x.numel() // x.shape[-1], used.shape[-1])


def assert_grads_close(got, want, tol, m, what=""):
    """Every gradient of `want` against `got` (relative error); None in `got` stands for zeros
    and is only allowed where the layer does not use the tensor (the router, query and keys
    under forward_routed)."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    for n, w in want.items():
        g = got[n]
        if g is None:
            assert not w.any(), f"{what}{n}: no gradient"
            continue
        if n not in ("x", "gates"):
            assert g.dtype == getattr(m, n).dtype and g.shape == getattr(m, n).shape, n
        assert_close(g.reshape(w.shape), w, tol, f"{what}grad {n}")


def assert_same_grads(got, want, tol, what=""):
    """Two op_grads results agree: None at the same tensors, the others within `tol`."""
    assert set(got) == set(want)
    for n, w in want.items():
        assert (got[n] is None) == (w is None), f"{what}{n}"
        if w is not None:
            assert got[n].dtype == w.dtype
            assert_close(got[n], w, tol, f"{what}grad {n}")


def check_routing(m, x, ids, tol, gap=1e-3, q_dtype=None):
    """The library's experts are exactly the K best: distinct, in range, their reference scores
    equal the K best (sorted), and the ids equal the reference's wherever the K-th and
    (K+1)-th scores are clearly apart (by `gap`, relative to the best score); in float64,
    the ids in the reference's exact order."""
    K = m.top_k
    S = reference_scores(m, x.detach().double().cpu(), q_dtype)
    ids = ids.reshape(-1, K).long().cpu()
    assert (ids >= 0).all() and (ids < S.shape[1]).all()
    for t in range(ids.shape[0]):
        assert len(set(ids[t].tolist())) == K, "expert ids repeat within a token"
    best = torch.sort(S, dim=-1, descending=True).values
    assert_close(torch.gather(S, 1, ids), best[:, :K], tol, "scores of the chosen ids vs the K best")
    ref_ids = top_k(S, K)
    if K < S.shape[1]:
        clear = (best[:, K - 1] - best[:, K]).abs() > gap * best[:, 0].abs().clamp_min(1e-3)
        assert clear.any()
        # The same experts (their order, descending score, is checked through the scores above).
        assert torch.equal(ids[clear].sort(-1).values, ref_ids[clear].sort(-1).values), \
            "routing differs where the scores are clearly apart"
    else:
        assert torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)
    if tol < 1e-8:  # float64: the exact order too
        assert torch.equal(ids, ref_ids)


# ---- CPU: forward against the reference ------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_reference(case, dtype):
    m = make(case, dtype).eval()
    x = random_x(case, dtype=dtype)
    with torch.no_grad():
        y, ids = m(x, return_expert_ids=True)
        assert torch.equal(m(x), y)
    assert y.shape == x.shape and y.dtype == dtype
    K = m.top_k if case.routed else 0
    assert ids.shape == (*x.shape[:-1], K) and ids.dtype == torch.int32
    xf = x.reshape(-1, case.hidden)
    if case.routed:
        check_routing(m, xf, ids, 1e-6 if dtype == torch.float32 else TOL.get(dtype, 1e-10))
    y_ref, _ = reference(m, xf, ids=ids.reshape(-1, K) if case.routed else None)
    assert_close(y.reshape(-1, case.hidden), y_ref, TOL[dtype], "y")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", ROUTED, ids=str)
def test_forward_routed_matches_reference(case, dtype):
    m = make(case, dtype)
    x = random_x(case, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, m.num_experts, (*x.shape[:-1], m.top_k), generator=g)  # repeats allowed
    gates = torch.rand(ids.shape, generator=g)
    with torch.no_grad():
        y = m.forward_routed(x, ids, gates)
        y_op, ids_op = torch.ops.omnimoe.baseline_forward(
            m.kind, x.reshape(-1, case.hidden), *entries(m).values(), *m.config().values(),
            ids.reshape(-1, m.top_k).int(), gates.reshape(-1, m.top_k))
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.equal(y_op.view_as(y), y)
    assert torch.equal(ids_op, ids.reshape(-1, m.top_k).int())  # the routing used, returned as given
    y_ref, _ = reference(m, x.reshape(-1, case.hidden), ids=ids.reshape(-1, m.top_k),
                         gates=gates.reshape(-1, m.top_k))
    assert_close(y.reshape(-1, case.hidden), y_ref, TOL[dtype], "y")


def test_leading_dimensions_and_non_contiguous_input():
    for case in (CASES[0], CASES[1], CASES[5]):
        m = make(case).eval()
        x = random_x(case, tokens=(4, 3))
        xt = x.transpose(0, 1)
        assert not xt.is_contiguous()
        with torch.no_grad():
            y = m(xt)
            assert y.shape == xt.shape
            assert torch.equal(y, m(xt.contiguous()))
            assert m(x[0, 0]).shape == (case.hidden,)


def test_functional_form_matches_module():
    case = CASES[3]
    m = make(case)
    x = random_x(case)
    with torch.no_grad():
        y, ids = omnimoe.baseline_layer("deepseekmoe", x, dict(m.named_parameters()), width=m.expert_width,
                                        num_experts=m.num_experts, top_k=m.top_k, shared_width=m.shared_width,
                                        return_expert_ids=True)
        y_mod, ids_mod = m(x, return_expert_ids=True)
    assert torch.equal(y, y_mod) and torch.equal(ids, ids_mod)


# ---- gradients -------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """gradcheck calls the op thousands of times on a few tokens: on one thread, as the
    library's OpenMP regions on such tiny inputs are mostly barrier waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gradcheck_inputs(case, m, tokens=5, seed=1):
    x = random_x(case, tokens=(tokens,), dtype=torch.float64, seed=seed).requires_grad_(True)
    names = [n for n, t in entries(m).items() if t is not None]
    params = [getattr(m, n).detach().clone().requires_grad_(True) for n in names]
    return x, names, params


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradcheck_f64(case, one_thread):
    # The library's forward recomputes the routing at every finite difference: these random
    # modules keep their K-th and (K+1)-th scores far more than eps apart, so it stays put.
    m = make(case, torch.float64)
    x, names, params = gradcheck_inputs(case, m)
    cfg = m.config()

    def layer(x, *ps):
        return omnimoe.baseline_layer(m.kind, x, dict(zip(names, ps)), **cfg)

    assert torch.autograd.gradcheck(layer, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("case", ROUTED, ids=str)
def test_gradcheck_f64_routed(case, one_thread):
    m = make(case, torch.float64)
    x, names, params = gradcheck_inputs(case, m)
    cfg = m.config()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, m.num_experts, (x.shape[0], m.top_k), generator=g)  # repeats allowed
    # The op takes float32 gates: multiples of 2^-12 in [1/8, 9/8], exact in float32, as are
    # their +-2^-10 finite differences (the layer is linear in the gates).
    gates = (torch.rand(ids.shape, generator=g, dtype=torch.float64) * 4096).round() / 4096 + 0.125

    def layer(x, *ps):
        return omnimoe.baseline_layer(m.kind, x, dict(zip(names, ps)), expert_ids=ids, gates=gates, **cfg)

    # x and the parameters (the router, query and keys take no part: zero gradients).
    assert torch.autograd.gradcheck(layer, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)

    def of_gates(gates, x):
        return omnimoe.baseline_layer(m.kind, x, dict(zip(names, params)), expert_ids=ids, gates=gates, **cfg)

    gates.requires_grad_(True)
    assert torch.autograd.gradcheck(of_gates, (gates, x), eps=2.0 ** -10, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("routed", [False, True], ids=["routing", "routed"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_match_reference_over_chunks(case, routed, monkeypatch):
    """float32 gradients of the op (every parameter, x, the given gates) against autograd of
    the float64 reference on the routing the op chose, the backward in chunks of 3 tokens."""
    if routed and not case.routed:
        pytest.skip("dense has no routing")
    monkeypatch.setattr(bbw, "CHUNK_TOKENS", 3)
    calls = []
    recompute = bbw.recompute
    monkeypatch.setattr(bbw, "recompute", lambda *a: calls.append(a[1].shape[0]) or recompute(*a))
    m = make(case)
    x = random_x(case, tokens=(4, 10))
    grad_y = random_x(case, tokens=(4, 10), seed=7)
    ids = gates = None
    if routed:
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, m.num_experts, (4, 10, m.top_k), generator=g)  # repeats allowed
        gates = torch.rand(ids.shape, generator=g)
    got, used = op_grads(m.forward_routed if routed else m, m, x, grad_y, ids, gates)
    assert calls == [3] * 13 + [1]  # 40 tokens: 14 chunks, the last one partial
    want = reference_grads(m, x, used if case.routed else None, grad_y, gates)
    assert_grads_close(got, want, 1e-5, m)
    if routed:  # the router / query / keys take no part in forward_routed
        unused = {"router", "query", "keys_row", "keys_col"}
        assert all(got[n] is None for n in unused & set(got))
    else:
        assert all(g is not None for g in got.values())


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_bfloat16_and_float16(case):
    """bfloat16 / float16 layers: the backward recomputes in float32 and casts each gradient
    back to its tensor's dtype."""
    for dtype in (torch.bfloat16, torch.float16):
        m = make(case, dtype)
        x = random_x(case, dtype=dtype)
        grad_y = random_x(case, seed=7, dtype=dtype)
        got, used = op_grads(m, m, x, grad_y)
        assert got["x"].dtype == dtype
        want = reference_grads(m, x, used if case.routed else None, grad_y)
        assert_grads_close(got, want, 1e-2, m, f"{dtype}: ")


def test_backward_in_training_loop_and_no_grad():
    for case in CASES:
        m = make(case)
        opt = torch.optim.SGD(m.parameters(), lr=1e-2)
        x = random_x(case)
        before = {n: t.detach().clone() for n, t in m.named_parameters()}
        loss = m(x).square().mean()
        loss.backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in m.parameters())
        opt.step()
        assert all(not torch.equal(before[n], t) for n, t in m.named_parameters()), case
        # Without anything that requires grad (or under no_grad) nothing is recorded.
        m.requires_grad_(False)
        assert not m(x).requires_grad
        m.requires_grad_(True)
        with torch.no_grad():
            assert not m(x).requires_grad
        with torch.inference_mode():
            assert m(x).shape == x.shape


def test_double_backward_is_refused():
    for case in (CASES[0], CASES[3], CASES[7]):
        m = make(case)
        x = random_x(case).requires_grad_(True)
        (gx,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
        assert gx.requires_grad
        with pytest.raises(RuntimeError, match="double backward"):
            gx.sum().backward()
        # A single backward with create_graph=True still gives the gradients.
        (gx_plain,) = torch.autograd.grad(m(x).sum(), x)
        assert torch.equal(gx.detach(), gx_plain)


def test_backward_deterministic_and_under_a_dispatch_mode():
    """Bitwise-equal gradients from two backward passes under
    torch.use_deterministic_algorithms(True); and the backward's kernel, which differentiates
    its recomputation, also runs under a TorchDispatchMode (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    for case in CASES:
        m = make(case)
        x = random_x(case)
        grad_y = random_x(case, seed=7)
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            first, _ = op_grads(m, m, x, grad_y)
            second, _ = op_grads(m, m, x, grad_y)
        finally:
            torch.use_deterministic_algorithms(was)
        for n, g in first.items():
            assert torch.equal(g, second[n]), n
        with FlopCounterMode(display=False):
            counted, _ = op_grads(m, m, x, grad_y)
        assert_same_grads(counted, first, 0.0, "FlopCounterMode: ")


def test_chunks_bound_memory_at_training_sizes():
    """At training sizes (T = 8192, H = 256, N = 16384, K up to 600) a chunk's [Tc, K, H]
    gathers stay under CHUNK_BYTES = 128 MiB, and T is split."""
    assert bbw.CHUNK_BYTES == 128 << 20 and bbw.CHUNK_TOKENS is None
    T, H = 8192, 256
    # kind, (width, num_experts, grid_rows, grid_cols, top_k, shared_width)
    for kind, cfg in [("pkm", (0, 16384, 128, 128, 600, 0)), ("peer", (0, 16384, 128, 128, 600, 0)),
                      ("peer", (0, 16384, 128, 128, 64, 0)), ("gshard", (1024, 16, 0, 0, 2, 0)),
                      ("deepseekmoe", (256, 64, 0, 0, 8, 512)), ("dense", (1024, 0, 0, 0, 0, 0))]:
        K, W = cfg[4], cfg[0]
        for itemsize in (4, 8):
            Tc = bbw.chunk_tokens(kind, H, cfg, itemsize)
            assert Tc >= 1
            # pkm forms no [Tc, K, H] tensor (embedding_bag); its backward's partial sums are
            # ~ Tc K H / 8 elements.
            per_token = K * H // 8 if kind == "pkm" else K * max(H, W) if kind != "dense" else W
            assert Tc * per_token * itemsize <= bbw.CHUNK_BYTES, (kind, cfg, Tc)
        if kind in ("pkm", "peer") and K == 600:
            assert bbw.chunk_tokens(kind, H, cfg, 4) < T


# ---- state_dict, dtype and device moves -----------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_state_dict_round_trip(case):
    m = make(case)
    sd = m.state_dict()
    want = EXPECTED_PARAMS.get(case.name, EXPECTED_PARAMS.get(m.kind))
    assert set(sd) == want
    fresh = case.make()
    fresh.load_state_dict(sd)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = random_x(case, seed=6)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


def test_parameter_shapes():
    H, W, N, K, S = 12, 8, 6, 2, 10
    m = omnimoe.DeepSeekMoE(H, W, N, K, shared_width=S)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {"router": (N, H), "expert_gate": (N * W, H), "expert_up": (N * W, H),
                      "expert_down": (N * H, W), "gate": (S, H), "up": (S, H), "down": (H, S)}
    assert m.gate is not None and omnimoe.DeepSeekMoE(H, W, N, K).gate is None
    m = omnimoe.PEER(16, (4, 6), 5)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {"query": (16, 16), "keys_row": (4, 8), "keys_col": (6, 8), "expert_in": (24, 16),
                      "expert_out": (24, 16)}
    assert omnimoe.PKM(16, 36, 5).values.shape == (36, 16)
    assert {n: tuple(p.shape) for n, p in omnimoe.Dense(16, 24).named_parameters()} == {
        "gate": (24, 16), "up": (24, 16), "down": (16, 24)}
    # The default init is finite, non-trivial and nn.Linear-like in scale.
    for case in CASES:
        for n, p in case.make().named_parameters():
            assert torch.isfinite(p).all() and p.std() > 0, n
            if n != "values":  # PKM values are normal with std 1/sqrt(H): unbounded
                assert p.abs().max() <= 1.0, n


def test_dtype_and_device_moves():
    for case in CASES:
        m = make(case)
        for dtype in (torch.bfloat16, torch.float16, torch.float64):
            moved = make(case).to(dtype)
            assert all(p.dtype == dtype for p in moved.parameters())
            x = random_x(case, dtype=dtype)
            with torch.no_grad():
                y = moved(x)
            assert y.dtype == dtype and torch.isfinite(y).all()
        assert all(p.dtype == torch.float32 for p in m.double().float().parameters())
        meta = case.make(device="meta", dtype=torch.bfloat16)
        assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in meta.parameters())
        if HAS_GPU:
            mc = make(case).cuda().to(torch.bfloat16)
            assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in mc.parameters())


# ---- argument errors -------------------------------------------------------------------------


def test_constructor_errors():
    with pytest.raises(ValueError, match="intermediate_size"):
        omnimoe.Dense(8, 0)
    with pytest.raises(ValueError, match="top_k"):
        omnimoe.GShard(8, 4, 3, 4)
    with pytest.raises(ValueError, match="expert_width"):
        omnimoe.GShard(8, 0, 3, 1)
    with pytest.raises(ValueError, match="shared_width"):
        omnimoe.DeepSeekMoE(8, 4, 3, 1, shared_width=-1)
    with pytest.raises(ValueError, match="even"):
        omnimoe.PKM(7, 4, 2)
    with pytest.raises(ValueError, match="perfect square"):
        omnimoe.PEER(8, 10, 2)
    with pytest.raises(ValueError, match="top_k"):
        omnimoe.PKM(8, (2, 3), 7)
    with pytest.raises(ValueError, match="num_experts"):
        omnimoe.PKM(8, (2, 3, 4), 2)
    assert omnimoe.PKM(8, 16, 2).grid_rows == 4 and omnimoe.PEER(8, (2, 3), 2).num_experts == 6


def test_forward_errors():
    with torch.no_grad():
        for case in CASES:
            m = make(case)
            with pytest.raises(ValueError, match="expected"):
                m(torch.randn(3, case.hidden + 2))  # wrong H: the library names the mismatched tensor
            with pytest.raises((TypeError, ValueError, RuntimeError)):
                m(torch.randn(3, case.hidden, dtype=torch.float64))  # dtype differs from the parameters
            with pytest.raises((TypeError, ValueError), match="float"):
                m(torch.randint(0, 3, (3, case.hidden)))
        m = make(CASES[1])
        x = random_x(CASES[1])
        ids = torch.zeros(3, 5, m.top_k, dtype=torch.int32)
        with pytest.raises(ValueError, match="expert_ids"):
            m.forward_routed(x, ids + m.num_experts, torch.rand(ids.shape))  # ids out of range
        with pytest.raises(ValueError, match="expert_ids"):
            m.forward_routed(x, ids[..., :1], torch.rand(3, 5, 1))  # [T, 1] instead of [T, K]
        with pytest.raises(ValueError, match="together"):
            omnimoe.baseline_layer("gshard", x, entries(m), expert_ids=ids, **m.config())
        with pytest.raises(ValueError, match="kind"):
            omnimoe.baseline_layer("moe", x, entries(m), **m.config())
        with pytest.raises(ValueError, match="unknown baseline parameters"):
            omnimoe.baseline_layer("gshard", x, {"routr": m.router}, **m.config())
        # The library checks every parameter: a missing or extra one, a wrong shape.
        with pytest.raises(ValueError, match="router"):
            omnimoe.baseline_layer("gshard", x, {**entries(m), "router": None}, **m.config())
        with pytest.raises(ValueError, match="values"):
            omnimoe.baseline_layer("gshard", x, {**entries(m), "values": m.router}, **m.config())
        with pytest.raises(ValueError, match="expert_down"):
            omnimoe.baseline_layer("gshard", x, {**entries(m), "expert_down": m.expert_gate}, **m.config())
        with pytest.raises(ValueError, match="top_k"):
            omnimoe.baseline_layer("gshard", x, entries(m), **{**m.config(), "top_k": 0})
        d = make(CASES[0])
        with pytest.raises(ValueError, match="dense"):
            omnimoe.baseline_layer("dense", random_x(CASES[0]), entries(d), expert_ids=ids, gates=torch.rand(ids.shape),
                                   **d.config())
        assert not hasattr(d, "forward_routed")


# ---- the op: opcheck, torch.compile ------------------------------------------------------


def op_args(m, x, requires_grad=False, routed=False):
    params = [None if p is None else p.detach().clone().requires_grad_(requires_grad) for p in entries(m).values()]
    args = (m.kind, x.reshape(-1, m.hidden_size).clone().requires_grad_(requires_grad), *params,
            *m.config().values())
    if routed:
        g = torch.Generator().manual_seed(4)
        T, K = args[1].shape[0], m.top_k
        ids = torch.randint(0, m.num_experts, (T, K), generator=g, dtype=torch.int32).to(x.device)
        gates = torch.rand(T, K, generator=g).to(x.device).requires_grad_(requires_grad)
        args = (*args, ids, gates)
    return args


@pytest.mark.parametrize("case", CASES, ids=str)
def test_opcheck_baseline_forward(case):
    # With inputs that require grad, opcheck's test_aot_dispatch_dynamic also runs the
    # backward (traced by AOTAutograd) against eager.
    for dtype in (torch.float32, torch.float64):
        m = make(case, dtype)
        x = random_x(case, dtype=dtype)
        torch.library.opcheck(torch.ops.omnimoe.baseline_forward.default, op_args(m, x))
        torch.library.opcheck(torch.ops.omnimoe.baseline_forward.default, op_args(m, x, requires_grad=True))
        if case.routed:
            torch.library.opcheck(torch.ops.omnimoe.baseline_forward.default, op_args(m, x, routed=True))
            torch.library.opcheck(torch.ops.omnimoe.baseline_forward.default,
                                  op_args(m, x, requires_grad=True, routed=True))


def test_op_does_not_mutate_its_inputs():
    for case in (CASES[3], CASES[7]):
        m = make(case)
        for routed in (False, True):
            args = op_args(m, random_x(case), routed=routed)
            before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            torch.ops.omnimoe.baseline_forward(*args)
            for a, b in zip(args, before):
                if isinstance(a, torch.Tensor):
                    assert torch.equal(a, b)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_opcheck_baseline_backward(case, monkeypatch):
    """omnimoe::baseline_backward (the op the autograd formula calls) on its own: schema, fake
    kernel, AOT dispatch; every gradient, some of them, and with the routing given."""
    monkeypatch.setattr(bbw, "CHUNK_TOKENS", 4)
    m = make(case)
    kind, _, *rest = op_args(m, random_x(case))
    x = random_x(case).reshape(-1, case.hidden)
    params, cfg = list(rest[:len(PARAMS)]), list(rest[len(PARAMS):])
    grad_y = random_x(case, seed=7).reshape(x.shape)
    with torch.no_grad():
        _, ids = torch.ops.omnimoe.baseline_forward(*op_args(m, x))
    n = len(PARAMS) + 2
    op = torch.ops.omnimoe.baseline_backward.default
    for needs in ([True] * n, [i % 2 == 0 for i in range(n)]):
        torch.library.opcheck(op, (kind, grad_y, x, params, None, ids, cfg, needs))
        out = op(kind, grad_y, x, params, None, ids, cfg, needs)
        assert len(out) == n and out[-1].numel() == 0  # no gates without forward_routed
        assert (out[0].shape == x.shape) == needs[0]
    if case.routed:
        *_, rids, rgates = op_args(m, x, routed=True)
        torch.library.opcheck(op, (kind, grad_y, x, params, rgates, rids, cfg, [True] * n))
        out = op(kind, grad_y, x, params, rgates, rids, cfg, [True] * n)
        assert out[-1].shape == rgates.shape and out[-1].dtype == torch.float32
        for name, g in zip(PARAMS, out[1:-1]):  # the router, query and keys take no part
            assert (g.numel() > 0) == (name in bbw.used_params(kind, True, entries(m)))


@pytest.mark.parametrize("case", ROUTED, ids=str)
def test_backward_refuses_ids_out_of_range(case):
    """Ids outside [0, N) reach the backward only from the GPU's forward_routed (which writes
    NaN rows instead of failing); the backward names the problem instead of indexing out of
    range."""
    m = make(case)
    x = random_x(case).reshape(-1, case.hidden)
    kind, _, *rest = op_args(m, x)
    params, cfg = list(rest[:len(PARAMS)]), list(rest[len(PARAMS):])
    with torch.no_grad():
        _, ids = torch.ops.omnimoe.baseline_forward(*op_args(m, x))
    n = len(PARAMS) + 2
    for bad in (-1, cfg[1]):
        wrong = ids.clone()
        wrong[0, 0] = bad
        with pytest.raises(ValueError, match="outside"):
            torch.ops.omnimoe.baseline_backward(kind, torch.ones_like(x), x, params, None, wrong, cfg, [True] * n)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5], CASES[7]], ids=str)
def test_compile_fullgraph_matches_eager(case, backend):
    torch._dynamo.reset()
    m = make(case).eval()
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    with torch.no_grad():
        for seed in (1, 2):  # the second call reuses the graph
            x = random_x(case, seed=seed)
            y_e, ids_e = m(x, return_expert_ids=True)
            y_c, ids_c = compiled(x, return_expert_ids=True)
            torch.testing.assert_close(y_c, y_e)
            assert torch.equal(ids_c, ids_e)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3], CASES[5], CASES[7]], ids=str)
def test_compile_with_grad_matches_eager(case, backend, monkeypatch):
    # Parameters that require grad outside no_grad: AOTAutograd traces the op's autograd
    # formula (the recomputation, in chunks here) into the backward graph.
    monkeypatch.setattr(bbw, "CHUNK_TOKENS", 4)
    torch._dynamo.reset()
    m = make(case)
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    for seed in (1, 2):  # the second call reuses the graph
        x = random_x(case, seed=seed)
        grad_y = random_x(case, seed=seed + 10)
        want, ids_e = op_grads(m, m, x, grad_y)
        got, ids_c = op_grads(compiled, m, x, grad_y)
        assert torch.equal(ids_c, ids_e)
        assert_same_grads(got, want, 1e-5, "compiled: ")
    if case.routed:
        routed = torch.compile(m.forward_routed, fullgraph=True, backend=backend)
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, m.num_experts, (3, 5, m.top_k), generator=g)
        gates = torch.rand(ids.shape, generator=g)
        x = random_x(case)
        want, _ = op_grads(m.forward_routed, m, x, x, ids, gates)
        got, _ = op_grads(routed, m, x, x, ids, gates)
        assert_same_grads(got, want, 1e-5, "compiled routed: ")


def test_compile_dynamic_token_count_and_routed():
    case = CASES[1]
    torch._dynamo.reset()
    m = make(case).eval()
    compiled = torch.compile(m, fullgraph=True, dynamic=True, backend="aot_eager")
    routed = torch.compile(m.forward_routed, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch.inference_mode():
        for tokens in ((3, 5), (2, 7), (11,)):
            x = random_x(case, tokens=tokens)
            torch.testing.assert_close(compiled(x), m(x))
            ids = torch.randint(0, m.num_experts, (*tokens, m.top_k))
            gates = torch.rand(ids.shape)
            torch.testing.assert_close(routed(x, ids, gates), m.forward_routed(x, ids, gates))
    # With gradients, the token count still dynamic.
    m.train()
    for tokens in ((3, 5), (2, 7), (11,)):
        x = random_x(case, tokens=tokens)
        assert_same_grads(op_grads(compiled, m, x, x)[0], op_grads(m, m, x, x)[0], 1e-5, f"{tokens}: ")
        ids = torch.randint(0, m.num_experts, (*tokens, m.top_k))
        gates = torch.rand(ids.shape)
        assert_same_grads(op_grads(routed, m, x, x, ids, gates)[0], op_grads(m.forward_routed, m, x, x, ids, gates)[0],
                          1e-5, f"routed {tokens}: ")


# ---- CUDA ------------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_matches_reference(case, dtype):
    m = make(case, dtype, "cuda").eval()
    x = random_x(case, tokens=(4, 32), dtype=dtype, device="cuda")
    with torch.no_grad():
        y, ids = m(x, return_expert_ids=True)
    assert y.device.type == "cuda" and y.dtype == dtype and ids.dtype == torch.int32
    xf = x.reshape(-1, case.hidden)
    K = m.top_k if case.routed else 0
    # The CUDA backend stores pkm / peer's query q in the layer's dtype (src/baselines/pkm.cu);
    # the reference rounds it alike, and allows more near-ties at bfloat16.
    q_dtype = dtype if dtype != torch.float32 else None
    if case.routed:
        check_routing(m, xf, ids, 1e-4 if dtype == torch.float32 else 2e-2,
                      gap=1e-3 if dtype == torch.float32 else 2e-2, q_dtype=q_dtype)
    y_ref, _ = reference(m, xf, ids=ids.reshape(-1, K).cpu() if case.routed else None, q_dtype=q_dtype)
    assert_close(y.reshape(-1, case.hidden), y_ref, CUDA_TOL[dtype], "y")
    if case.routed:
        g = torch.Generator().manual_seed(3)
        rids = torch.randint(0, m.num_experts, (xf.shape[0], K), generator=g)
        gates = torch.rand(rids.shape, generator=g)
        with torch.no_grad():
            yr = m.forward_routed(xf, rids.cuda(), gates.cuda())
        assert_close(yr, reference(m, xf, ids=rids, gates=gates)[0], CUDA_TOL[dtype], "y routed")


@needs_gpu
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_and_cpu_agree(case):
    m = make(case).eval()
    x = random_x(case, tokens=(64,))
    with torch.no_grad():
        y_cpu, ids_cpu = m(x, return_expert_ids=True)
        m.cuda()
        y_gpu, ids_gpu = m(x.cuda(), return_expert_ids=True)
    same = (ids_cpu == ids_gpu.cpu()).all(dim=-1)
    assert same.float().mean() > 0.9  # near-ties may flip between backends
    assert_close(y_gpu.cpu()[same], y_cpu[same], 1e-4, "y on tokens routed alike")


# Relative tolerances of the CUDA gradients against the float64 ones (the backward recomputes
# in float32; bfloat16 rounds each gradient).
CUDA_GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_cuda_gradients_match_cpu_float64(case, dtype, monkeypatch):
    """Gradients on CUDA (x, every parameter; forward_routed: and the gates) against autograd
    of the float64 reference on the CPU, on the routing the CUDA forward chose; the backward in
    chunks of 50 tokens."""
    monkeypatch.setattr(bbw, "CHUNK_TOKENS", 50)
    m = make(case, dtype, "cuda")
    x = random_x(case, tokens=(4, 32), dtype=dtype, device="cuda")
    grad_y = random_x(case, tokens=(4, 32), dtype=dtype, device="cuda", seed=7)
    got, used = op_grads(m, m, x, grad_y)
    assert all(g is not None and g.device.type == "cuda" for g in got.values())
    want = reference_grads(m, x, used if case.routed else None, grad_y)
    assert_grads_close(got, want, CUDA_GRAD_TOL[dtype], m, f"cuda {dtype}: ")
    if case.routed:
        g = torch.Generator().manual_seed(3)
        ids = torch.randint(0, m.num_experts, (4, 32, m.top_k), generator=g)
        gates = torch.rand(ids.shape, generator=g)
        got, _ = op_grads(m.forward_routed, m, x, grad_y, ids.cuda(), gates.cuda())
        assert got["gates"].dtype == torch.float32 and got["gates"].device.type == "cuda"
        want = reference_grads(m, x, ids.reshape(-1, m.top_k), grad_y, gates)
        assert_grads_close(got, want, CUDA_GRAD_TOL[dtype], m, f"cuda {dtype} routed: ")


@needs_gpu
def test_cuda_backward_deterministic():
    """Under torch.use_deterministic_algorithms(True) the CUDA backward (index_add_, the
    backward of index_select, gather and embedding_bag) gives bitwise-equal gradients."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for case in CASES:
            m = make(case, torch.float32, "cuda")
            x = random_x(case, tokens=(4, 64), device="cuda")
            grad_y = random_x(case, tokens=(4, 64), device="cuda", seed=7)
            first, _ = op_grads(m, m, x, grad_y)
            second, _ = op_grads(m, m, x, grad_y)
            for n, g in first.items():
                assert torch.equal(g, second[n]), (case.name, n)
    finally:
        torch.use_deterministic_algorithms(was)


@needs_gpu
def test_cuda_backward_memory_is_bounded():
    """At training sizes (T = 8192, H = 256, bfloat16; PKM / PEER with N = 16384, K = 600) the
    backward's peak memory stays within a few CHUNK_BYTES plus float32 copies of the tensors,
    far below the [T, K, H] gathers of a one-shot recomputation (5 GB here)."""
    T, H = 8192, 256
    f = {"device": "cuda", "dtype": torch.bfloat16}
    for m in (omnimoe.PEER(H, 16384, 600, **f), omnimoe.PKM(H, 16384, 600, **f), omnimoe.GShard(H, 512, 16, 2, **f),
              omnimoe.DeepSeekMoE(H, 256, 32, 4, shared_width=512, **f)):
        x = torch.randn(T, H, **f, requires_grad=True)
        y = m(x)
        grad_y = torch.randn_like(y)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        y.backward(grad_y)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        params_f32 = sum(p.numel() for p in m.parameters()) * 4
        bound = 3 * bbw.CHUNK_BYTES + 4 * params_f32 + 8 * T * H * 4
        assert extra <= bound, (type(m).__name__, extra, bound)
        assert all(torch.isfinite(p.grad).all() for p in m.parameters()) and torch.isfinite(x.grad).all()
        del x, y, grad_y
        if isinstance(m, omnimoe.PKM):
            assert bound < T * m.top_k * H * 4 / 4


@needs_gpu
def test_cuda_opcheck_and_compile_with_grad():
    for case in (CASES[0], CASES[3], CASES[7]):
        m = make(case, torch.float32, "cuda")
        x = random_x(case, dtype=torch.float32, device="cuda")
        torch.library.opcheck(torch.ops.omnimoe.baseline_forward.default, op_args(m, x))
        torch.library.opcheck(torch.ops.omnimoe.baseline_forward.default, op_args(m, x, requires_grad=True))
        if case.routed:
            torch.library.opcheck(torch.ops.omnimoe.baseline_forward.default, op_args(m, x, routed=True))
            torch.library.opcheck(torch.ops.omnimoe.baseline_forward.default,
                                  op_args(m, x, requires_grad=True, routed=True))
    for dtype in (torch.float32, torch.bfloat16):
        case = CASES[5]
        torch._dynamo.reset()
        m = make(case, dtype, "cuda").eval()
        compiled = torch.compile(m, fullgraph=True)
        with torch.no_grad():
            for seed in (1, 2):
                x = random_x(case, tokens=(2, 64), dtype=dtype, device="cuda", seed=seed)
                torch.testing.assert_close(compiled(x), m(x))
        for case in (CASES[3], CASES[7]):  # with gradients
            torch._dynamo.reset()
            m = make(case, dtype, "cuda")
            compiled = torch.compile(m, fullgraph=True)
            x = random_x(case, tokens=(2, 64), dtype=dtype, device="cuda")
            assert_same_grads(op_grads(compiled, m, x, x)[0], op_grads(m, m, x, x)[0],
                              1e-5 if dtype == torch.float32 else 1e-2, f"cuda {dtype} compiled: ")


@needs_gpu
def test_cuda_current_stream_and_graph_capture():
    case = CASES[3]
    m = make(case, torch.bfloat16, "cuda").eval()
    x = random_x(case, tokens=(256,), dtype=torch.bfloat16, device="cuda")
    x2 = random_x(case, tokens=(256,), dtype=torch.bfloat16, device="cuda", seed=9)
    check_current_stream_and_graph_capture(m, x, x2)
