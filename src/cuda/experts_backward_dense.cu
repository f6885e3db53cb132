// CUDA experts stage, backward, dense regime (many tokens per expert): the products of the
// backward on tensor cores, over (token chunk, expert chunk) groups of 2048 x 2048 (the
// tasks sorted by expert chunk one token chunk at a time: schedule_token_chunks). Per expert
// chunk ec, per token chunk tc:
//   S  = x w_inᵀ, DA = dy w_outᵀ                cuBLASLt, storage dtype [rows, Ec]
//   at the group's tasks only (0 elsewhere):     A = g act(S), DH = DA g act'(S), dg = DA act(S)
//   gin (+)= DHᵀ x, gout (+)= Aᵀ dy              cuBLASLt, fp32 [Ec, H], token chunks in order
//   dx_acc += DH w_in                            cuBLASLt, fp32, expert chunks in order
// then each expert row of the chunk is stored once (dense table, or its sparse slot).
// Task-values form (where the forward adds its outputs at the chosen cells: few experts per
// token and chunk): S and DA are not formed. Per token chunk, s and da at its tasks only
// (dense_task_scores: the forward's block-sparse tile product, both products over the same
// slots), then per task a, dh and dg into [T K] arrays; the groups scatter those into A and
// DH (cells_kernel, from either source). The three products on the right are the same in
// both forms.
// Never a T x N buffer: chunk-sized ones, and in the task-values form two values per task
// ([T K]); no float atomics on the outputs: deterministic.
#include "core/math.hpp"
#include "cuda/cuda.cuh"

namespace omnimoe::cuda {
namespace {

constexpr int kTaskBlocks = 528, kTaskThreads = 256;  // grid-stride over a group's tasks

// A group's cells of A and DH, from the group's S and DA (products form, which also gives
// dgate) or from the per-task a and dh (task-values form), added into the group's pair of
// A / DH buffers; in the same launch the previous group's cells are reset to 0 in the other
// pair, so each pair is zero again before its next group. Two pairs used by alternate
// groups, so no launch clears and fills one cell.
enum class Cells { products, values };
struct CellArgs {
  const i32* tasks;    // the schedule's sorted tasks
  const i32* offsets;  // and its group offsets
  const i32* ids;
  const float* gates;
  const void *s, *da;    // products: [Tc, Ec] storage dtype
  const void *va, *vdh;  // values: [T K] storage dtype
  float* dgates;
  i64 ec;                // Ec, the cells' row stride
  int K;
  Activation act;
};
struct GroupCells {
  i64 group, t0, e0;  // schedule index (< 0: none) and chunk origin
  void *pa, *pdh;     // its pair
};
template <class S, Cells kMode>
__global__ void cells_kernel(CellArgs p, GroupCells cur, GroupCells prev) {
  const i32 begin = p.offsets[cur.group], n = p.offsets[cur.group + 1] - begin;
  const i32 pbegin = prev.group >= 0 ? p.offsets[prev.group] : 0;
  const i32 pn = prev.group >= 0 ? p.offsets[prev.group + 1] - pbegin : 0;
  for (i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x; i < n + pn;
       i += static_cast<i64>(gridDim.x) * blockDim.x) {
    if (i >= n) {  // the previous group's cell, in the other pair
      const i32 task = p.tasks[pbegin + (i - n)];
      const i64 idx = (task / p.K - prev.t0) * p.ec + (p.ids[task] - prev.e0);
      static_cast<S*>(prev.pa)[idx] = static_cast<S*>(prev.pdh)[idx] = from_f32<S>(0.f);
      continue;
    }
    const i32 task = p.tasks[begin + i];
    const i64 idx = (task / p.K - cur.t0) * p.ec + (p.ids[task] - cur.e0);
    S av, dv;
    if constexpr (kMode == Cells::values) {
      av = static_cast<const S*>(p.va)[task];
      dv = static_cast<const S*>(p.vdh)[task];
    } else {
      const float h = to_f32(static_cast<const S*>(p.s)[idx]), d = to_f32(static_cast<const S*>(p.da)[idx]);
      const float g = p.gates[task], sv = activate(p.act, h);
      p.dgates[task] = d * sv;
      av = from_f32<S>(g * sv);
      dv = from_f32<S>(d * g * activate_grad(p.act, h));
    }
    // Adds, as in the forward: a caller routing may name one expert twice for a token.
    atomicAdd(static_cast<S*>(cur.pa) + idx, av);
    atomicAdd(static_cast<S*>(cur.pdh) + idx, dv);
  }
}

// Task-values form, one token chunk of n tasks: a = g act(s), dh = da g act'(s) and
// dg = da act(s) per task, rounded as the products form rounds them into A and DH. Tasks
// with an id < 0 are skipped (bad_tokens_kernel set their dg).
template <class S>
__global__ void task_values_kernel(i64 n, const i32* __restrict__ ids, const float* __restrict__ gates,
                                   const S* __restrict__ s, const S* __restrict__ da, S* __restrict__ va,
                                   S* __restrict__ vdh, float* __restrict__ dgates, Activation act) {
  const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n || ids[i] < 0) return;
  const float h = to_f32(s[i]), d = to_f32(da[i]), g = gates[i], sv = activate(act, h);
  dgates[i] = d * sv;
  va[i] = from_f32<S>(g * sv);
  vdh[i] = from_f32<S>(d * g * activate_grad(act, h));
}

// Tasks with an id out of range (marked -1): dgate 0, token flagged (its dx becomes NaN).
__global__ void bad_tokens_kernel(const i32* __restrict__ ids, i64 T, int K, float* __restrict__ dgates,
                                  int* __restrict__ bad) {
  const i64 t = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= T) return;
  int flag = 0;
  for (int k = 0; k < K; ++k)
    if (ids[t * K + k] < 0) {
      dgates[t * K + k] = 0.f;
      flag = 1;
    }
  bad[t] = flag;
}

// Rows [e0, e0 + cols) of the fp32 accumulators to the caller: dense rows e, or sparse slot
// rank[e] for chosen experts (unchosen ones have no slot).
template <class S>
__global__ void store_chunk_kernel(const float* __restrict__ gin, const float* __restrict__ gout, i64 e0, i64 cols,
                                   i64 H, const i32* __restrict__ active, const i32* __restrict__ rank,
                                   S* __restrict__ dw_in, S* __restrict__ dw_out) {
  const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= cols * H) return;
  const i64 e = e0 + i / H, c = i % H;
  i64 row = e;
  if (rank != nullptr) {
    if (!active[e]) return;
    row = rank[e];
  }
  dw_in[row * H + c] = from_f32<S>(gin[i]);
  dw_out[row * H + c] = from_f32<S>(gout[i]);
}

// Sparse padding slots [count, capacity): zero rows.
template <class S>
__global__ void zero_padding_kernel(const i32* __restrict__ count, i64 capacity, i64 H, S* __restrict__ dw_in,
                                    S* __restrict__ dw_out) {
  const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= capacity * H || i / H < *count) return;
  dw_in[i] = dw_out[i] = from_f32<S>(0.f);
}

template <class S>
Status run(const DenseBackwardArgs& a, cudaStream_t stream) {
  const Config& c = *a.cfg;
  const DenseBackwardBuffers& b = *a.buf;
  const TokenChunkSchedule& sc = b.schedule;
  const i64 T = a.T, H = c.hidden, K = c.top_k, N = c.num_experts(), Ec = sc.expert_chunk, Tc = sc.token_chunk;
  const DType dt = a.dtype, f32 = DType::f32;
  bad_tokens_kernel<<<ceil_div(T, 256), 256, 0, stream>>>(a.ids, T, static_cast<int>(K), a.dgates, a.bad);
  OMNIMOE_CUDA_LAUNCH_CHECK("experts_backward_dense bad_tokens_kernel");
  OMNIMOE_RETURN_IF_ERROR(schedule_token_chunks(a.ids, T, K, sc, stream));
  S* va = static_cast<S*>(b.va);
  S* vdh = static_cast<S*>(b.vdh);
  if (b.task_values) {  // before A and DH are cleared: the task scores' buffers share their memory
    const ExpertsArgs e{&c, T, dt, a.x, a.w_in, a.w_out, a.ids, a.gates, nullptr};
    const TaskProduct second{a.dy, a.w_out, b.task_da};
    for (i64 t0 = 0; t0 < T; t0 += Tc) {
      const i64 rows = std::min(Tc, T - t0);
      TaskScores ts = b.scores;  // its sort's outputs are per call
      OMNIMOE_RETURN_IF_ERROR(dense_task_scores(e, ts, t0, rows, stream, &second));
      task_values_kernel<S><<<ceil_div(rows * K, 256), 256, 0, stream>>>(
          rows * K, a.ids + t0 * K, a.gates + t0 * K, static_cast<const S*>(ts.s), static_cast<const S*>(b.task_da),
          va + t0 * K, vdh + t0 * K, a.dgates + t0 * K, c.activation);
      OMNIMOE_CUDA_LAUNCH_CHECK("experts_backward_dense task_values_kernel");
    }
  }
  const CellArgs cells{sc.tasks, sc.offsets, a.ids, a.gates, b.s, b.da, va, vdh, a.dgates, Ec, static_cast<int>(K),
                       c.activation};
  const auto chunk_bytes = static_cast<std::size_t>(Tc * Ec) * sizeof(S);
  for (int q = 0; q < 2; ++q) {
    OMNIMOE_CUDA_TRY(cudaMemsetAsync(b.pa[q], 0, chunk_bytes, stream));
    OMNIMOE_CUDA_TRY(cudaMemsetAsync(b.pdh[q], 0, chunk_bytes, stream));
  }
  GroupCells prev{-1, 0, 0, nullptr, nullptr};
  i64 n_group = 0;
  for (i64 ec = 0; ec < sc.n_ec; ++ec) {
    const i64 e0 = ec * Ec, cols = std::min(Ec, N - e0);
    for (i64 tc = 0; tc < sc.n_tc; ++tc, ++n_group) {
      const i64 t0 = tc * Tc, rows = std::min(Tc, T - t0), group = tc * (sc.n_ec + 1) + ec;
      const char* x = at(a.x, t0 * H, dt);
      const char* dy = at(a.dy, t0 * H, dt);
      const GroupCells cur{group, t0, e0, b.pa[n_group % 2], b.pdh[n_group % 2]};
      if (b.task_values) {
        cells_kernel<S, Cells::values><<<kTaskBlocks, kTaskThreads, 0, stream>>>(cells, cur, prev);
      } else {
        OMNIMOE_RETURN_IF_ERROR(gemm(
            gemm_args(false, true, rows, cols, H, x, H, at(a.w_in, e0 * H, dt), H, b.s, Ec, dt, dt, 0.f), b.gemm,
            stream));
        OMNIMOE_RETURN_IF_ERROR(gemm(
            gemm_args(false, true, rows, cols, H, dy, H, at(a.w_out, e0 * H, dt), H, b.da, Ec, dt, dt, 0.f), b.gemm,
            stream));
        cells_kernel<S, Cells::products><<<kTaskBlocks, kTaskThreads, 0, stream>>>(cells, cur, prev);
      }
      OMNIMOE_CUDA_LAUNCH_CHECK("experts_backward_dense cells_kernel");
      const float beta = tc > 0 ? 1.f : 0.f;
      OMNIMOE_RETURN_IF_ERROR(
          gemm(gemm_args(true, false, cols, H, rows, cur.pdh, Ec, x, H, b.gin, H, dt, f32, beta), b.gemm, stream));
      OMNIMOE_RETURN_IF_ERROR(
          gemm(gemm_args(true, false, cols, H, rows, cur.pa, Ec, dy, H, b.gout, H, dt, f32, beta), b.gemm, stream));
      OMNIMOE_RETURN_IF_ERROR(gemm(gemm_args(false, false, rows, H, cols, cur.pdh, Ec, at(a.w_in, e0 * H, dt), H,
                                           a.dx_acc + t0 * H, H, dt, f32, 1.f),
                                   b.gemm, stream));
      prev = cur;
    }
    const bool sparse = a.sparse != nullptr;
    store_chunk_kernel<S><<<ceil_div(cols * H, 256), 256, 0, stream>>>(
        b.gin, b.gout, e0, cols, H, sparse ? a.seg->active : nullptr, sparse ? a.seg->rank : nullptr,
        static_cast<S*>(sparse ? a.sparse->dw_in : a.dw_in), static_cast<S*>(sparse ? a.sparse->dw_out : a.dw_out));
    OMNIMOE_CUDA_LAUNCH_CHECK("experts_backward_dense store_chunk_kernel");
  }
  if (a.sparse != nullptr) {
    zero_padding_kernel<S><<<ceil_div(a.sparse->capacity * H, 256), 256, 0, stream>>>(
        a.sparse->count, a.sparse->capacity, H, static_cast<S*>(a.sparse->dw_in), static_cast<S*>(a.sparse->dw_out));
    OMNIMOE_CUDA_LAUNCH_CHECK("experts_backward_dense zero_padding_kernel");
  }
  return Status::Ok();
}

}  // namespace

Status experts_backward_dense(const DenseBackwardArgs& a, cudaStream_t stream) {
  switch (a.dtype) {
    case DType::bf16: return run<__nv_bfloat16>(a, stream);
    case DType::f16: return run<__half>(a, stream);
    case DType::f32: return run<float>(a, stream);
    default: return {StatusCode::unsupported, "CUDA backward: dtype must be f32, bf16 or f16"};
  }
}

}  // namespace omnimoe::cuda
