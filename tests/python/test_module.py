"""omnimoe.OmniMoE on the CPU against the float64 pure-PyTorch reference of DESIGN section 1:
routing, forward, every gradient, batchnorm train / eval behaviour, state_dict, dtype and
device moves, argument errors."""

import pytest
import torch

import omnimoe
from conftest import CASES, TOL, assert_close, make_module, random_x, reference_of
from reference import top_k as reference_top_k

PARAM_NAMES = ("router_row", "router_col", "expert_in", "expert_out", "gate", "up", "down")
STAT_NAMES = ("running_mean_row", "running_var_row", "running_mean_col", "running_var_col")


def check_routing(routing, ref, x, tol):
    """The library's choice is exactly the K best scores: its scores equal the reference's
    K largest (sorted), ids agree wherever the K-th and (K+1)-th scores are apart, and each
    id's reference score equals the library's score."""
    from reference import all_scores, router_log_probs

    K = ref.top_k
    stats = {n: getattr(ref, n).clone() for n in STAT_NAMES} if ref.router_norm == "batchnorm" else None
    with torch.no_grad():
        pr, pc = router_log_probs(x.reshape(-1, x.shape[-1]), ref.router_row, ref.router_col, ref.router_norm,
                                  ref.training, stats)
        S = all_scores(pr, pc)
    ids = routing.expert_ids.reshape(-1, K).long()
    assert ids.dtype == torch.int64 and (ids >= 0).all() and (ids < S.shape[1]).all()
    for t in range(ids.shape[0]):
        assert len(set(ids[t].tolist())) == K, "expert ids repeat within a token"
    got_scores = routing.scores.reshape(-1, K).double()
    assert_close(got_scores, torch.gather(S, 1, ids), tol, "scores of the chosen ids")
    best = torch.sort(S, dim=-1, descending=True).values
    assert_close(got_scores, best[:, :K], tol, "chosen scores vs the K best")
    ref_ids = reference_top_k(S, K)
    if K < S.shape[1]:
        gap = (best[:, K - 1] - best[:, K]).abs()
        clear = gap > 1e-3
        assert clear.any()
        assert torch.equal(ids[clear], ref_ids[clear]), "routing differs where the scores are clearly apart"
    else:
        assert torch.equal(ids, ref_ids)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_forward_and_gradients_match_reference(case, training, dtype):
    m = make_module(case, dtype).train(training)
    ref = reference_of(m, case)
    x = random_x(case, dtype=dtype).requires_grad_(True)
    xr = x.detach().double().requires_grad_(True)

    y, routing = m(x, return_routing=True)
    assert y.shape == x.shape and y.dtype == dtype
    assert routing.expert_ids.shape == (*x.shape[:-1], case.top_k) and routing.expert_ids.dtype == torch.int32
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert routing.scores.dtype == acc and routing.gates.dtype == acc
    assert not routing.gates.requires_grad and not routing.scores.requires_grad

    tol = TOL[dtype]
    check_routing(routing, ref, x.detach(), tol)  # before ref runs: its statistics are the old ones
    y_ref, _, _, gates_ref = ref(xr, expert_ids=routing.expert_ids)
    assert_close(y, y_ref, tol, "y")
    assert_close(routing.gates.reshape(-1, case.top_k), gates_ref, tol, "gates")
    if case.router_norm == "batchnorm":
        for n in STAT_NAMES:
            assert_close(getattr(m, n), getattr(ref, n), tol, n)  # updated (train) / untouched (eval)

    gy = torch.randn_like(y_ref)
    (y * gy.to(dtype)).sum().backward()
    (y_ref * gy).sum().backward()
    assert_close(x.grad, xr.grad, tol * 10, "grad x")
    for n in PARAM_NAMES:
        p, pr = getattr(m, n), getattr(ref, n)
        if p is None:
            assert case.intermediate == 0
            continue
        assert p.grad is not None and p.grad.dtype == dtype, n
        assert_close(p.grad, pr.grad, tol * 10, f"grad {n}")


def test_eval_uses_running_statistics_and_train_updates_them():
    case = CASES[0]
    m = make_module(case)
    x = random_x(case)
    before = {n: getattr(m, n).clone() for n in STAT_NAMES}
    m.eval()
    y1 = m(x)
    y2 = m(x)
    assert torch.equal(y1, y2)
    for n in STAT_NAMES:
        assert torch.equal(getattr(m, n), before[n]), f"eval forward changed {n}"
    m.train()
    m(x)
    for n in STAT_NAMES:
        assert not torch.equal(getattr(m, n), before[n]), f"train forward left {n} unchanged"
    # Two training forwards before one backward (gradient accumulation) are fine.
    xg = x.clone().requires_grad_(True)
    (m(xg).sum() + m(xg * 2).sum()).backward()
    assert torch.isfinite(xg.grad).all()
    # Training with batchnorm needs two tokens or more (unbiased running variance).
    with pytest.raises((ValueError, RuntimeError)):
        m(x[:1, :1])
    m.eval()
    assert m(x[:1, :1]).shape == (1, 1, case.hidden)


def test_state_dict_round_trip():
    case = CASES[0]
    m = make_module(case).train()
    m(random_x(case, seed=5))  # move the running statistics away from their initial values
    sd = m.state_dict()
    assert set(sd) == set(PARAM_NAMES) | set(STAT_NAMES)
    assert sd["router_row"].shape == (4, 16) and sd["router_col"].shape == (6, 16)
    assert sd["expert_in"].shape == (24, 16) and sd["expert_out"].shape == (24, 16)
    assert sd["gate"].shape == (24, 16) and sd["up"].shape == (24, 16) and sd["down"].shape == (16, 24)
    assert sd["running_mean_row"].shape == (4,) and sd["running_var_col"].shape == (6,)
    fresh = omnimoe.OmniMoE(case.hidden, case.intermediate, case.grid, case.top_k)
    fresh.load_state_dict(sd)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = random_x(case, seed=6)
    assert torch.equal(fresh.eval()(x), m.eval()(x))
    # No shared branch, no batchnorm: those entries are absent.
    m0 = omnimoe.OmniMoE(8, 0, (2, 2), 2, router_norm="none")
    assert set(m0.state_dict()) == {"router_row", "router_col", "expert_in", "expert_out"}


def test_dtype_and_device_moves():
    case = CASES[0]
    m = make_module(case)
    stats = {n: getattr(m, n).clone() for n in STAT_NAMES}
    for dtype in (torch.bfloat16, torch.float16):
        moved = make_module(case).to(dtype)
        assert moved.router_row.dtype == dtype and moved.gate.dtype == dtype
        for n in STAT_NAMES:  # the library's accumulation dtype, values kept exactly
            assert getattr(moved, n).dtype == torch.float32
            assert torch.equal(getattr(moved, n), stats[n])
    m64 = make_module(case).double()
    assert m64.running_mean_row.dtype == torch.float64
    assert m64.float().running_mean_row.dtype == torch.float32
    assert make_module(case).to("cpu").running_var_col.device.type == "cpu"
    if torch.cuda.is_available():
        mc = make_module(case).cuda().to(torch.bfloat16)
        assert mc.running_mean_row.device.type == "cuda" and mc.running_mean_row.dtype == torch.float32
        assert mc.expert_in.device.type == "cuda"
    m_meta = omnimoe.OmniMoE(16, 24, (4, 6), 5, device="meta", dtype=torch.bfloat16)
    assert m_meta.running_mean_row.dtype == torch.float32 and m_meta.router_row.device.type == "meta"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_precision_storage_on_cpu(dtype):
    case = CASES[1]
    m = make_module(case, dtype).train()
    ref = reference_of(m, case)  # parameters as rounded to `dtype`
    x = random_x(case, dtype=dtype).requires_grad_(True)
    y, routing = m(x, return_routing=True)
    xr = x.detach().double().requires_grad_(True)
    y_ref, _, _, _ = ref(xr, expert_ids=routing.expert_ids)
    assert_close(y, y_ref, TOL[dtype], "y")
    gy = torch.randn_like(y_ref)
    (y * gy.to(dtype)).sum().backward()
    (y_ref * gy).sum().backward()
    assert_close(x.grad, xr.grad, TOL[dtype], "grad x")
    for n in PARAM_NAMES:
        assert_close(getattr(m, n).grad, getattr(ref, n).grad, TOL[dtype], f"grad {n}")


def test_leading_dimensions_and_non_contiguous_input():
    case = CASES[0]
    m = make_module(case).eval()
    x = random_x(case, tokens=(4, 3))
    xt = x.transpose(0, 1)  # [3, 4, H], not contiguous
    assert not xt.is_contiguous()
    y = m(xt)
    assert y.shape == xt.shape
    assert torch.equal(y, m(xt.contiguous()))
    y1 = m(x[0, 0])  # a single token [H]
    assert y1.shape == (case.hidden,)


def test_functional_form_matches_module():
    case = CASES[1]
    m = make_module(case).train()
    x = random_x(case)
    stats = {n: getattr(m, n).clone() for n in STAT_NAMES}
    y, routing = omnimoe.omnimoe_layer(
        x, *(getattr(m, n) for n in PARAM_NAMES), *stats.values(), top_k=case.top_k, router_norm=case.router_norm,
        gate_fn=case.gate, activation=case.activation, training=True, return_routing=True)
    y_mod, routing_mod = m(x, return_routing=True)
    assert torch.equal(y, y_mod) and torch.equal(routing.expert_ids, routing_mod.expert_ids)
    for n in STAT_NAMES:
        assert torch.equal(stats[n], getattr(m, n)), f"functional form updated {n} differently"


def test_argument_errors():
    with pytest.raises(ValueError, match="perfect square"):
        omnimoe.OmniMoE(8, 8, 10, 2)
    with pytest.raises(ValueError, match="top_k"):
        omnimoe.OmniMoE(8, 8, (2, 2), 5)
    with pytest.raises(ValueError, match="router_norm"):
        omnimoe.OmniMoE(8, 8, 4, 2, router_norm="layernorm")
    with pytest.raises(ValueError, match="gate"):
        omnimoe.OmniMoE(8, 8, 4, 2, gate="sigmoid")
    with pytest.raises(ValueError, match="activation"):
        omnimoe.OmniMoE(8, 8, 4, 2, activation="tanh")
    with pytest.raises(ValueError, match="num_experts"):
        omnimoe.OmniMoE(8, 8)
    assert omnimoe.OmniMoE(8, 8, grid=(2, 3), top_k=2).num_experts == 6
    assert omnimoe.OmniMoE(8, 8, 6, 2, grid=(2, 3)).grid_cols == 3
    with pytest.raises(ValueError, match="disagrees"):
        omnimoe.OmniMoE(8, 8, 8, 2, grid=(2, 3))
    with pytest.raises(ValueError, match="disagrees"):
        omnimoe.OmniMoE(8, 8, (3, 2), 2, grid=(2, 3))
    assert omnimoe.OmniMoE(8, 8, 16, 2).grid_rows == 4
    m = omnimoe.OmniMoE(8, 8, (2, 3), 2).eval()
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(3, 7))  # wrong H: the library's message names x
    with pytest.raises((TypeError, ValueError, RuntimeError)):
        m(torch.randn(3, 8, dtype=torch.float64))  # dtype differs from the parameters
    with pytest.raises((TypeError, ValueError), match="float"):
        m(torch.randint(0, 3, (3, 8)))


@pytest.mark.parametrize("schedule", ["token", "expert"])
def test_schedules_give_the_same_results_on_cpu(schedule):
    # The CPU computes the layer one way whatever the schedule: the same y, routing, running
    # statistics and gradients as 'auto', bit for bit, through the module and the functional form.
    case = CASES[1]
    outs = []
    for s in ("auto", schedule):
        m = make_module(case, schedule=s).train()
        assert m.schedule == s and f"schedule={s!r}" in repr(m)
        x = random_x(case).requires_grad_(True)
        y, routing = m(x, return_routing=True)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append((y.detach(), routing, x.grad, [getattr(m, n).grad for n in PARAM_NAMES],
                     [getattr(m, n) for n in STAT_NAMES]))
    (y0, r0, gx0, gp0, st0), (y1, r1, gx1, gp1, st1) = outs
    assert torch.equal(y1, y0)
    for a, b in zip(r1, r0):
        assert torch.equal(a, b)
    assert torch.equal(gx1, gx0)
    for n, a, b in zip(PARAM_NAMES, gp1, gp0):
        assert torch.equal(a, b), f"grad {n}"
    for n, a, b in zip(STAT_NAMES, st1, st0):
        assert torch.equal(a, b), n
    m = make_module(case).eval()
    x = random_x(case)
    y_fn = omnimoe.omnimoe_layer(
        x, *(getattr(m, n) for n in PARAM_NAMES), *(getattr(m, n) for n in STAT_NAMES), top_k=case.top_k,
        router_norm=case.router_norm, gate_fn=case.gate, activation=case.activation, schedule=schedule)
    assert torch.equal(y_fn, m(x))


def test_bad_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule"):
        omnimoe.OmniMoE(8, 8, 4, 2, schedule="fast")
    with pytest.raises(ValueError, match="schedule"):
        omnimoe.OmniMoE(8, 8, 4, 2, schedule="expert_centric")  # the C++ enumerator is not a spelling
    assert omnimoe.SCHEDULES == ("auto", "expert", "token")
    # The op checks its own argument (the functional form passes it through unchecked).
    case = CASES[0]
    m = make_module(case).eval()
    with pytest.raises(ValueError, match="schedule must be 'auto', 'expert' or 'token', got 'dense'"):
        omnimoe.omnimoe_layer(random_x(case), *(getattr(m, n) for n in PARAM_NAMES),
                              *(getattr(m, n) for n in STAT_NAMES), top_k=case.top_k, schedule="dense")


def test_double_backward_is_refused():
    case = CASES[0]
    m = make_module(case).eval()
    x = random_x(case).requires_grad_(True)
    (gx,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()
