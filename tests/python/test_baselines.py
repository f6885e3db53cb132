"""The baseline modules (omnimoe.Dense, GShard, DeepSeekMoE, PKM, PEER; the library's
include/omnimoe/baselines.hpp) against a float64 pure-PyTorch reference written here from the
formulas of baselines.hpp alone: forward and routing on the CPU (float64, float32, bfloat16),
forward_routed, the forward-only contract (backpropagating raises), state_dict, dtype and
device moves, argument errors, opcheck of omnimoe::baseline_forward, torch.compile, and the
CUDA backend (float32, bfloat16; skipped without a GPU)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import omnimoe
from conftest import assert_close

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


def reference_scores(m, x, q_dtype=None):
    """Router scores [T, N] whose top-K is the routing: softmax probabilities (gshard,
    deepseekmoe) or s1[i] + s2[j] at e = i * Nc + j (pkm, peer). `q_dtype` rounds the query
    q to that dtype, as the CUDA backend stores it (in the layer's dtype)."""
    p = {n: t.detach().double().cpu() for n, t in entries(m).items() if t is not None}
    if m.kind in ("gshard", "deepseekmoe"):
        return torch.softmax(x @ p["router"].t(), dim=-1)
    H = m.hidden_size
    q = x @ p["query"].t()
    if q_dtype is not None:
        q = q.to(q_dtype).double()
    s1 = q[:, : H // 2] @ p["keys_row"].t()
    s2 = q[:, H // 2:] @ p["keys_col"].t()
    return (s1[:, :, None] + s2[:, None, :]).reshape(x.shape[0], -1)


def reference(m, x, ids=None, gates=None, q_dtype=None):
    """(y [T, H], ids [T, K]) of module m for x [T, H], all in float64 on the CPU. `ids`
    imposes the experts (the gates then follow from the scores, as the layer computes them);
    `ids` and `gates` together are forward_routed (the gates used as given)."""
    x = x.detach().double().cpu()
    p = {n: t.detach().double().cpu() for n, t in entries(m).items() if t is not None}
    T, H = x.shape
    if m.kind == "dense":
        return swiglu(x, p["gate"], p["up"], p["down"]), torch.empty(T, 0, dtype=torch.int64)
    K = m.top_k
    if gates is None:
        S = reference_scores(m, x, q_dtype)
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
    gates = gates.double().cpu()
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


# ---- forward only ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_is_refused(case):
    m = make(case)  # parameters require grad, as nn.Parameters do
    x = random_x(case)
    y = m(x)
    assert y.requires_grad  # differentiable inputs: the autograd formula is in the graph ...
    with pytest.raises(NotImplementedError, match="only the forward for baselines"):
        y.sum().backward()  # ... and it refuses instead of returning wrong gradients
    xg = x.clone().requires_grad_(True)
    m.requires_grad_(False)
    with pytest.raises(NotImplementedError, match="only the forward"):
        torch.autograd.grad(m(xg).sum(), xg)
    # Without anything that requires grad (or under no_grad) nothing is recorded.
    assert not m(x).requires_grad
    m.requires_grad_(True)
    with torch.no_grad():
        assert not m(x).requires_grad
    with torch.inference_mode():
        assert m(x).shape == x.shape


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
        args = (*args, ids, torch.rand(T, K, generator=g).to(x.device))
    return args


# torch.library.opcheck runs these four tests by default. With inputs that require grad,
# test_aot_dispatch_dynamic also runs the backward of the op, which raises by design (the
# library has no backward for the baselines): it is skipped there, the other three still run.
NO_BACKWARD = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_opcheck_baseline_forward(case):
    for dtype in (torch.float32, torch.float64):
        m = make(case, dtype)
        x = random_x(case, dtype=dtype)
        torch.library.opcheck(torch.ops.omnimoe.baseline_forward.default, op_args(m, x))
        if case.routed:
            torch.library.opcheck(torch.ops.omnimoe.baseline_forward.default, op_args(m, x, routed=True))
        torch.library.opcheck(torch.ops.omnimoe.baseline_forward.default, op_args(m, x, requires_grad=True),
                              test_utils=NO_BACKWARD)


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


def test_compile_with_grad_enabled_is_refused():
    # Parameters that require grad outside no_grad: AOTAutograd traces the backward at compile
    # time, and the op's autograd formula refuses there too.
    case = CASES[1]
    torch._dynamo.reset()
    compiled = torch.compile(make(case), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="only the forward for baselines"):
        compiled(random_x(case))


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


@needs_gpu
def test_cuda_opcheck_compile_and_backward_refused():
    for case in (CASES[0], CASES[3], CASES[7]):
        m = make(case, torch.float32, "cuda")
        x = random_x(case, dtype=torch.float32, device="cuda")
        torch.library.opcheck(torch.ops.omnimoe.baseline_forward.default, op_args(m, x))
        if case.routed:
            torch.library.opcheck(torch.ops.omnimoe.baseline_forward.default, op_args(m, x, routed=True))
        with pytest.raises(NotImplementedError, match="only the forward"):
            m(x).sum().backward()
    for dtype in (torch.float32, torch.bfloat16):
        case = CASES[5]
        torch._dynamo.reset()
        m = make(case, dtype, "cuda").eval()
        compiled = torch.compile(m, fullgraph=True)
        with torch.no_grad():
            for seed in (1, 2):
                x = random_x(case, tokens=(2, 64), dtype=dtype, device="cuda", seed=seed)
                torch.testing.assert_close(compiled(x), m(x))


@needs_gpu
def test_cuda_current_stream_and_graph_capture():
    case = CASES[3]
    m = make(case, torch.bfloat16, "cuda").eval()
    x = random_x(case, tokens=(256,), dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        want = m(x)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # the op must queue on torch's current stream
            got = m(x)
        torch.cuda.current_stream().wait_stream(side)
        assert torch.equal(got, want)
        static_x = x.clone()
        warm = torch.cuda.Stream()
        warm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warm):
            m(static_x)
        torch.cuda.current_stream().wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = m(static_x)
        x2 = random_x(case, tokens=(256,), dtype=torch.bfloat16, device="cuda", seed=9)
        static_x.copy_(x2)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_y, m(x2))
