"""Float64 reference of the OmniMoE layer (DESIGN.md section 1) for tiny layers, and a
random layer generator: what the CLI tests hold `omnimoe run` to."""
import math
import random

EPS, MOMENTUM = 1e-5, 0.1

ACTIVATIONS = {
    "silu": lambda h: h / (1.0 + math.exp(-h)),
    "gelu": lambda h: 0.5 * h * (1.0 + math.erf(h / math.sqrt(2.0))),
    "relu": lambda h: h if h > 0 else 0.0,
}


def random_layer(seed, T, H, I, Nr, Nc, batchnorm=True):
    """{name: (shape, values)} with values O(1) and never zero."""
    rng = random.Random(seed)

    def uni(n, scale, offset=0.0):
        return [offset + scale * rng.choice((-1, 1)) * rng.uniform(0.05, 1.0) for _ in range(n)]

    N, a = Nr * Nc, math.sqrt(3.0 / H)
    t = {
        "x": ([T, H], uni(T * H, 1.0)),
        "router_row": ([Nr, H], uni(Nr * H, a)),
        "router_col": ([Nc, H], uni(Nc * H, a)),
        "expert_in": ([N, H], uni(N * H, a)),
        "expert_out": ([N, H], uni(N * H, a)),
    }
    if I:
        t["gate"] = ([I, H], uni(I * H, a))
        t["up"] = ([I, H], uni(I * H, a))
        t["down"] = ([H, I], uni(H * I, math.sqrt(3.0 / I)))
    if batchnorm:
        t["running_mean_row"] = ([Nr], uni(Nr, 0.2))
        t["running_var_row"] = ([Nr], uni(Nr, 0.4, 1.0))
        t["running_mean_col"] = ([Nc], uni(Nc, 0.2))
        t["running_var_col"] = ([Nc], uni(Nc, 0.4, 1.0))
    t["grad_y"] = ([T, H], uni(T * H, 1.0))
    return t


def _dot(a, b):
    return sum(u * v for u, v in zip(a, b))


def _rows(flat, n):
    return [flat[i:i + n] for i in range(0, len(flat), n)]


def _route_axis(x, w, H, M, norm, training, mean, var):
    """Log-softmax of the normalised logits [T][M]; returns it and the new running stats."""
    W = _rows(w, H)
    logits = [[_dot(xt, W[m]) for m in range(M)] for xt in x]
    T = len(x)
    new_mean, new_var = mean, var
    if norm == "batchnorm":
        if training:
            mu = [sum(l[m] for l in logits) / T for m in range(M)]
            v = [sum((l[m] - mu[m]) ** 2 for l in logits) / T for m in range(M)]
            new_mean = [(1 - MOMENTUM) * mean[m] + MOMENTUM * mu[m] for m in range(M)]
            new_var = [(1 - MOMENTUM) * var[m] + MOMENTUM * v[m] * T / (T - 1) for m in range(M)]
        else:
            mu, v = mean, var
        logits = [[(l[m] - mu[m]) / math.sqrt(v[m] + EPS) for m in range(M)] for l in logits]
    out = []
    for l in logits:
        mx = max(l)
        lse = mx + math.log(sum(math.exp(u - mx) for u in l))
        out.append([u - lse for u in l])
    return out, new_mean, new_var


def forward(t, cfg, training, ids=None):
    """t: {name: values (flat)}; cfg: top_k, grid_rows, grid_cols, router_norm, gate,
    activation, H, I. Routing `ids` [T][K] may be imposed (finite differences).
    Returns dict with y [T*H], ids [T][K], scores, gates [T*K] and running statistics."""
    H, I, Nr, Nc, K = cfg["H"], cfg["I"], cfg["grid_rows"], cfg["grid_cols"], cfg["top_k"]
    norm, act = cfg.get("router_norm", "batchnorm"), ACTIVATIONS[cfg.get("activation", "silu")]
    x = _rows(t["x"], H)
    bn = norm == "batchnorm"
    pr, mr, vr = _route_axis(x, t["router_row"], H, Nr, norm, training,
                             t.get("running_mean_row"), t.get("running_var_row"))
    pc, mc, vc = _route_axis(x, t["router_col"], H, Nc, norm, training,
                             t.get("running_mean_col"), t.get("running_var_col"))
    Win, Wout = _rows(t["expert_in"], H), _rows(t["expert_out"], H)
    out = {"y": [], "ids": [], "scores": [], "gates": []}
    for tok, xt in enumerate(x):
        def score(e):
            return pr[tok][e // Nc] + pc[tok][e % Nc]
        chosen = ids[tok] if ids is not None else sorted(range(Nr * Nc), key=lambda e: (-score(e), e))[:K]
        s = [score(e) for e in chosen]
        if cfg.get("gate", "exp") == "exp":
            g = [math.exp(v) for v in s]
        else:
            mx = max(s)
            z = sum(math.exp(v - mx) for v in s)
            g = [math.exp(v - mx) / z for v in s]
        y = [0.0] * H
        for e, ge in zip(chosen, g):
            a = ge * act(_dot(xt, Win[e]))
            y = [yh + a * w for yh, w in zip(y, Wout[e])]
        if I:
            G, U, D = _rows(t["gate"], H), _rows(t["up"], H), _rows(t["down"], I)
            m = [ACTIVATIONS["silu"](_dot(xt, G[i])) * _dot(xt, U[i]) for i in range(I)]
            y = [y[h] + _dot(m, D[h]) for h in range(H)]
        out["y"] += y
        out["ids"].append(list(chosen))
        out["scores"] += s
        out["gates"] += g
    if bn:
        out.update(running_mean_row=mr, running_var_row=vr, running_mean_col=mc, running_var_col=vc)
    return out


def numeric_gradients(t, cfg, training, names, step=1e-6):
    """Central differences of <grad_y, y> with the routing held at the unperturbed one (the
    selected indices are constants of the backward); returns {name: [gradient values]}."""
    base_ids = forward(t, cfg, training)["ids"]

    def loss():
        return _dot(t["grad_y"], forward(t, cfg, training, ids=base_ids)["y"])

    grads = {}
    for name in names:
        values, g = t[name], []
        for i in range(len(values)):
            saved = values[i]
            values[i] = saved + step
            lp = loss()
            values[i] = saved - step
            lm = loss()
            values[i] = saved
            g.append((lp - lm) / (2 * step))
        grads[name] = g
    return grads
