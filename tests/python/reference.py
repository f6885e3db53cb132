"""A pure-PyTorch reference of the OmniMoE layer, written from DESIGN.md section 1 alone
(no code of the library or of the package): float64 throughout, all N scores materialised,
top-K by a stable sort. Differentiable through autograd; the chosen experts are constants
(as in the specification), and can be imposed (`expert_ids`) so that tests compare y and the
gradients on the library's own routing where near-ties could flip a choice."""

import torch
import torch.nn.functional as F

EPS = 1e-5
MOMENTUM = 0.1


def _act(name, h):
    if name == "silu":
        return F.silu(h)
    if name == "gelu":
        return F.gelu(h)  # exact (erf)
    if name == "relu":
        return F.relu(h)
    raise ValueError(name)


def router_log_probs(x, router_row, router_col, router_norm, training, stats):
    """pr [T, Nr], pc [T, Nc]; `stats` (dict of float64 tensors, or None) is updated in
    training mode with batchnorm."""
    x = x.double()
    out = []
    for axis, w in (("row", router_row), ("col", router_col)):
        logits = x @ w.double().t()
        if router_norm == "batchnorm":
            if training:
                T = logits.shape[0]
                mean = logits.mean(0)
                var = logits.var(0, unbiased=False)
                if stats is not None:
                    with torch.no_grad():
                        rm, rv = stats[f"running_mean_{axis}"], stats[f"running_var_{axis}"]
                        rm.mul_(1 - MOMENTUM).add_(MOMENTUM * mean.detach())
                        rv.mul_(1 - MOMENTUM).add_(MOMENTUM * var.detach() * T / (T - 1))
            else:
                mean = stats[f"running_mean_{axis}"].double()
                var = stats[f"running_var_{axis}"].double()
            logits = (logits - mean) / torch.sqrt(var + EPS)
        out.append(torch.log_softmax(logits, dim=-1))
    return out


def all_scores(pr, pc):
    """S [T, N], S[t, i * Nc + j] = pr[t, i] + pc[t, j]."""
    return (pr[:, :, None] + pc[:, None, :]).reshape(pr.shape[0], -1)


def top_k(S, K):
    """The K largest scores per token, by descending score then ascending id."""
    order = torch.sort(S.detach(), dim=-1, descending=True, stable=True).indices
    return order[:, :K]


def forward(x, p, *, top_k_, router_norm="batchnorm", gate_fn="exp", activation="silu", training=False,
            stats=None, expert_ids=None):
    """Returns (y [T, H] float64, expert_ids [T, K] int64, scores, gates). `p` holds the
    parameters by their DESIGN names (gate/up/down may be None)."""
    pr, pc = router_log_probs(x, p["router_row"], p["router_col"], router_norm, training, stats)
    S = all_scores(pr, pc)
    ids = top_k(S, top_k_) if expert_ids is None else expert_ids.long()
    scores = torch.gather(S, 1, ids)
    if gate_fn == "exp":
        gates = torch.exp(scores)
    elif gate_fn == "softmax":
        gates = torch.softmax(scores, dim=-1)
    else:
        raise ValueError(gate_fn)
    xd = x.double()
    w_in = p["expert_in"].double()[ids]  # [T, K, H]
    w_out = p["expert_out"].double()[ids]
    h = torch.einsum("th,tkh->tk", xd, w_in)
    a = gates * _act(activation, h)
    y = torch.einsum("tk,tkh->th", a, w_out)
    if p.get("gate") is not None:
        m = F.silu(xd @ p["gate"].double().t()) * (xd @ p["up"].double().t())
        y = y + m @ p["down"].double().t()
    return y, ids, scores, gates


class ReferenceOmniMoE(torch.nn.Module):
    """The reference as a module with the same parameter and buffer names as omnimoe.OmniMoE,
    computing in float64 (load a module's state_dict into it to compare)."""

    PARAMS = ("router_row", "router_col", "expert_in", "expert_out", "gate", "up", "down")
    STATS = ("running_mean_row", "running_var_row", "running_mean_col", "running_var_col")

    def __init__(self, hidden, intermediate, grid, top_k_, router_norm="batchnorm", gate_fn="exp",
                 activation="silu"):
        super().__init__()
        H, I, (Nr, Nc) = hidden, intermediate, grid
        N = Nr * Nc
        self.top_k, self.router_norm, self.gate_fn, self.activation = top_k_, router_norm, gate_fn, activation
        d = torch.float64
        self.router_row = torch.nn.Parameter(torch.zeros(Nr, H, dtype=d))
        self.router_col = torch.nn.Parameter(torch.zeros(Nc, H, dtype=d))
        self.expert_in = torch.nn.Parameter(torch.zeros(N, H, dtype=d))
        self.expert_out = torch.nn.Parameter(torch.zeros(N, H, dtype=d))
        for name, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            self.register_parameter(name, torch.nn.Parameter(torch.zeros(*shape, dtype=d)) if I > 0 else None)
        for name in self.STATS:
            n = Nr if name.endswith("_row") else Nc
            self.register_buffer(name, torch.zeros(n, dtype=d) if router_norm == "batchnorm" else None)

    def forward(self, x, expert_ids=None):
        lead, H = x.shape[:-1], x.shape[-1]
        p = {n: getattr(self, n) for n in self.PARAMS}
        stats = {n: getattr(self, n) for n in self.STATS} if self.router_norm == "batchnorm" else None
        y, ids, scores, gates = forward(
            x.reshape(-1, H), p, top_k_=self.top_k, router_norm=self.router_norm, gate_fn=self.gate_fn,
            activation=self.activation, training=self.training, stats=stats,
            expert_ids=None if expert_ids is None else expert_ids.reshape(-1, self.top_k))
        return y.reshape(*lead, H), ids.reshape(*lead, self.top_k), scores, gates
