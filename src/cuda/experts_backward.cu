// CUDA experts stage, backward. Token side: one warp per token recomputes h and da for its
// K tasks and accumulates dx in its own row. Expert side: one warp per expert sums its tasks
// (sorted by expert, tokens ascending) into the two gradient rows and writes each row once,
// zero for unchosen experts. No atomics: deterministic. Also the SwiGLU backward and the
// final fp32 -> storage conversion.
#include "core/math.hpp"
#include "cuda/cuda.cuh"

namespace omnimoe::cuda {
namespace {

constexpr int kWarps = 8;

template <class S>
__global__ void __launch_bounds__(kWarps * 32)
    tokens_kernel(i64 T, int H, int K, Activation act, const S* __restrict__ x, const S* __restrict__ w_in,
                  const S* __restrict__ w_out, const i32* __restrict__ ids, const float* __restrict__ gates,
                  const S* __restrict__ dy, float* __restrict__ a_out, float* __restrict__ dg_out,
                  float* __restrict__ dh_out, float* __restrict__ dx, int* __restrict__ bad) {
  const int lane = threadIdx.x & 31;
  const i64 t = static_cast<i64>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t >= T) return;
  int bad_id = 0;
  for (int k = 0; k < K; ++k) {
    const i64 task = t * K + k, e = ids[task];
    if (e < 0) {
      if (lane == 0) a_out[task] = dg_out[task] = dh_out[task] = 0.f;
      bad_id = 1;
      continue;
    }
    float h = 0.f, da = 0.f;
    for (int i = lane; i < H; i += 32) {
      h = fmaf(to_f32(x[t * H + i]), to_f32(w_in[e * H + i]), h);
      da = fmaf(to_f32(dy[t * H + i]), to_f32(w_out[e * H + i]), da);
    }
    h = warp_sum(h);
    da = warp_sum(da);
    const float g = gates[task], s = activate(act, h), dh = da * g * activate_grad(act, h);
    if (lane == 0) {
      a_out[task] = g * s;
      dg_out[task] = da * s;
      dh_out[task] = dh;
    }
    for (int i = lane; i < H; i += 32) dx[t * H + i] = fmaf(dh, to_f32(w_in[e * H + i]), dx[t * H + i]);
  }
  if (lane == 0) bad[t] = bad_id;
}

// One warp per expert; the row is covered in slices of 32 * kSlice elements.
constexpr int kSlice = 8;

template <class S>
__global__ void __launch_bounds__(kWarps * 32)
    rows_kernel(i64 N, int H, int K, const S* __restrict__ x, const S* __restrict__ dy, const i32* __restrict__ tasks,
                const i32* __restrict__ offsets, const float* __restrict__ a, const float* __restrict__ dh,
                S* __restrict__ dw_in, S* __restrict__ dw_out) {
  const int lane = threadIdx.x & 31;
  const i64 e = static_cast<i64>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (e >= N) return;
  const i32 begin = offsets[e], end = offsets[e + 1];
  for (int h0 = 0; h0 < H; h0 += 32 * kSlice) {
    float gi[kSlice], go[kSlice];
#pragma unroll
    for (int j = 0; j < kSlice; ++j) gi[j] = go[j] = 0.f;
    for (i32 i = begin; i < end; ++i) {
      const i32 task = tasks[i];
      const i64 t = task / K;
      const float w = dh[task], v = a[task];
#pragma unroll
      for (int j = 0; j < kSlice; ++j) {
        const int c = h0 + j * 32 + lane;
        if (c < H) {
          gi[j] = fmaf(w, to_f32(x[t * H + c]), gi[j]);
          go[j] = fmaf(v, to_f32(dy[t * H + c]), go[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kSlice; ++j) {
      const int c = h0 + j * 32 + lane;
      if (c < H) {
        dw_in[e * H + c] = from_f32<S>(gi[j]);
        dw_out[e * H + c] = from_f32<S>(go[j]);
      }
    }
  }
}

template <class S>
__global__ void swiglu_backward_kernel(S* u, S* v, S* dm, i64 n) {
  const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float uu = to_f32(u[i]), vv = to_f32(v[i]), d = to_f32(dm[i]);
  const float s = sigmoid(uu), silu = uu * s;
  u[i] = from_f32<S>(d * vv * s * (1.f + uu * (1.f - s)));  // du
  v[i] = from_f32<S>(silu * vv);                            // m
  dm[i] = from_f32<S>(d * silu);                            // dv
}

template <class S>
__global__ void store_rows_kernel(const float* src, i64 T, i64 H, const int* bad, S* dst) {
  const i64 i = static_cast<i64>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * H) return;
  dst[i] = from_f32<S>(bad != nullptr && bad[i / H] ? __int_as_float(0x7fffffff) : src[i]);
}

template <class F>
Status by_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::bf16: return f(__nv_bfloat16{});
    case DType::f16: return f(__half{});
    case DType::f32: return f(float{});
    default: return {StatusCode::unsupported, "CUDA backward: dtype must be f32, bf16 or f16"};
  }
}

}  // namespace

Status experts_backward_tokens(const ExpertsArgs& a, const void* dy, float* act_out, float* dgates, float* dh,
                               float* dx_acc, int* bad, cudaStream_t stream) {
  const Config& c = *a.cfg;
  return by_dtype(a.dtype, [&](auto tag) {
    using S = decltype(tag);
    tokens_kernel<S><<<ceil_div(a.T, kWarps), kWarps * 32, 0, stream>>>(
        a.T, static_cast<int>(c.hidden), static_cast<int>(c.top_k), c.activation, static_cast<const S*>(a.x),
        static_cast<const S*>(a.w_in), static_cast<const S*>(a.w_out), a.ids, a.gates, static_cast<const S*>(dy),
        act_out, dgates, dh, dx_acc, bad);
    OMNIMOE_CUDA_LAUNCH_CHECK("experts_backward tokens_kernel");
    return Status::Ok();
  });
}

Status experts_backward_rows(const Config& cfg, DType dtype, const void* x, const void* dy, const i32* tasks,
                             const i32* offsets, const float* act_out, const float* dh, void* dw_in, void* dw_out,
                             cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    rows_kernel<S><<<ceil_div(cfg.num_experts(), kWarps), kWarps * 32, 0, stream>>>(
        cfg.num_experts(), static_cast<int>(cfg.hidden), static_cast<int>(cfg.top_k), static_cast<const S*>(x),
        static_cast<const S*>(dy), tasks, offsets, act_out, dh, static_cast<S*>(dw_in), static_cast<S*>(dw_out));
    OMNIMOE_CUDA_LAUNCH_CHECK("experts_backward rows_kernel");
    return Status::Ok();
  });
}

Status shared_mlp_swiglu_backward(DType dtype, void* u, void* v, void* dm, i64 n, cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    swiglu_backward_kernel<S><<<ceil_div(n, 256), 256, 0, stream>>>(static_cast<S*>(u), static_cast<S*>(v),
                                                                    static_cast<S*>(dm), n);
    OMNIMOE_CUDA_LAUNCH_CHECK("shared_mlp swiglu_backward_kernel");
    return Status::Ok();
  });
}

Status store_rows(DType dtype, const float* src, i64 T, i64 H, const int* bad, void* dst, cudaStream_t stream) {
  return by_dtype(dtype, [&](auto tag) {
    using S = decltype(tag);
    store_rows_kernel<S><<<ceil_div(T * H, 256), 256, 0, stream>>>(src, T, H, bad, static_cast<S*>(dst));
    OMNIMOE_CUDA_LAUNCH_CHECK("store_rows_kernel");
    return Status::Ok();
  });
}

}  // namespace omnimoe::cuda
