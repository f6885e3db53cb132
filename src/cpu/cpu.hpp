// CPU reference backend: stage functions (route, schedule, experts, shared_mlp) in a compute
// type C (double for f64 layers, float otherwise) over storage type S of the expert tables.
// The CUDA backend (src/cuda/) has stage files of the same names.
#pragma once

#include <cstdint>

#include "core/half.hpp"
#include "omnimoe/config.hpp"

namespace omnimoe::cpu {

using i64 = std::int64_t;
using i32 = std::int32_t;

// ---- route ------------------------------------------------------------------------------
// Per-thread scratch of the exact bounded top-K search.
template <class C>
struct TopkEntry {
  C score;  // S = pr[i] + pc[j]
  i32 e;    // i * Nc + j
  i32 p, q; // positions in the sorted row / column candidate lists
};
template <class C>
struct TopkScratch {
  int threads = 1;            // number of per-thread slices
  i32* index = nullptr;       // [threads][Nr + Nc] candidate sort space
  TopkEntry<C>* heap = nullptr;  // [threads][3K + 1]: frontier heap, selection, ties
};

// lr = x router_rowᵀ [T, Nr], lc = x router_colᵀ [T, Nc].
template <class C>
void route_logits(const Config& cfg, i64 T, const C* x, const C* w_row, const C* w_col, C* lr, C* lc);
// In place over l [T, n]: batchnorm (training: batch statistics, running update; inference:
// running statistics) or nothing. Writes the mean and 1/sqrt(var + eps) used to mean/rstd.
template <class C>
void route_normalize(const Config& cfg, Mode mode, i64 T, i64 n, C* l, C* mean, C* rstd, C* running_mean,
                     C* running_var, double* acc);  // acc: [2n] double scratch
// logp[t, :] = log_softmax(l[t, :]) over n.
template <class C>
void route_log_softmax(i64 T, i64 n, const C* l, C* logp);
// Exact top-K of S = pr[i] + pc[j] for each token: descending score, ties by ascending e.
template <class C>
void route_topk(const Config& cfg, i64 T, const C* pr, const C* pc, TopkScratch<C> scratch, i32* ids, C* scores);
// gates from the K selected scores: exp(S) or softmax over the K.
template <class C>
void route_gates(const Config& cfg, i64 T, const C* scores, C* gates);
// S of given ids (backward recomputes the forward's scores for its routing).
template <class C>
void route_scores_of(const Config& cfg, i64 T, const C* pr, const C* pc, const i32* ids, C* scores);

// Backward: dS from dgates (in place over dgates), then the log-prob gradients dpr, dpc.
template <class C>
void route_gates_backward(const Config& cfg, i64 T, const C* gates, C* dgates_to_dscores);
template <class C>
void route_scores_backward(const Config& cfg, i64 T, const i32* ids, const C* dscores, C* dpr, C* dpc);
// In place: d <- d - softmax(logp) * sum(d), per token.
template <class C>
void route_log_softmax_backward(i64 T, i64 n, const C* logp, C* d);
// In place through the norm: training batchnorm uses lhat (normalised logits) and rstd.
template <class C>
void route_normalize_backward(const Config& cfg, Mode mode, i64 T, i64 n, const C* lhat, const C* rstd, C* d,
                              double* acc);
// dW_row = dlrᵀ x, dW_col = dlcᵀ x, dx += dlr W_row + dlc W_col.
template <class C>
void route_weights_backward(const Config& cfg, i64 T, const C* x, const C* w_row, const C* w_col, const C* dlr,
                            const C* dlc, C* dw_row, C* dw_col, C* dx);

// ---- schedule ---------------------------------------------------------------------------
// Tasks (t, k) grouped by expert, ascending token inside each expert: a stable counting sort.
struct Schedule {
  i64* offsets = nullptr;  // [N + 1]: tasks of expert e are order[offsets[e] .. offsets[e + 1])
  i64* order = nullptr;    // [T * K]: task index t * K + k
};
void schedule_by_expert(i64 num_experts, i64 num_tasks, const i32* ids, Schedule s);

// ---- experts ----------------------------------------------------------------------------
// y[t] += sum_k g * act(x[t] . w_in[e]) * w_out[e]   (token-centric; see experts.cpp).
template <class C, class S>
void experts_forward(const Config& cfg, i64 T, const C* x, const S* w_in, const S* w_out, const i32* ids,
                     const C* gates, C* y);
// Per task: a = g * act(h) and dh = da * g * act'(h) with da = dy[t] . w_out[e];
// dgates = da * act(h); dx[t] += sum_k dh * w_in[e].
template <class C, class S>
void experts_backward_tokens(const Config& cfg, i64 T, const C* x, const S* w_in, const S* w_out, const i32* ids,
                             const C* gates, const C* dy, C* a, C* dh, C* dgates, C* dx);
// Each expert row written once: dw_out[e] = sum a * dy[t], dw_in[e] = sum dh * x[t] over its
// tasks in schedule order; rows of unchosen experts are zero.
// `rows`: [threads][2 * H] scratch holding one gradient row pair per thread.
// Where the rows go: dense tables [N, H] (ids == nullptr), or the sparse form of
// SparseExpertGradients (active experts ascending in slots 0 .. count-1, then id -1 and
// zero rows up to capacity).
template <class S>
struct ExpertRows {
  S* dw_in = nullptr;
  S* dw_out = nullptr;
  i32* ids = nullptr;    // sparse: [capacity]
  i32* count = nullptr;  // sparse: [1]
  i64 capacity = 0;      // sparse: slots
};
template <class C, class S>
void experts_backward_weights(const Config& cfg, const C* x, const C* dy, Schedule s, const C* a, const C* dh,
                              int threads, C* rows, ExpertRows<S> out);

// ---- shared_mlp -------------------------------------------------------------------------
// y = (silu(x gateᵀ) * (x upᵀ)) downᵀ (overwrites y); u, v: [T, I] scratch.
template <class C>
void shared_mlp_forward(const Config& cfg, i64 T, const C* x, const C* gate, const C* up, const C* down, C* u, C* v,
                        C* y);
// Gradients of the shared branch; dx accumulates. u, v, dm: [T, I] scratch.
template <class C>
void shared_mlp_backward(const Config& cfg, i64 T, const C* x, const C* gate, const C* up, const C* down, const C* dy,
                         C* u, C* v, C* dm, C* dgate, C* dup, C* ddown, C* dx);

}  // namespace omnimoe::cpu
