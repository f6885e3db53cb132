// GShard and DeepSeekMoE baselines, CUDA: workspace plan and the stage sequence.
//   route     logits = x routerᵀ (cuBLASLt, fp32 out); fused softmax + top-K + gates
//             (gshard_route.cu); or the caller's routing
//   schedule  tasks sorted by expert on the device, segment and tile offsets (gshard_schedule.cu)
//   experts   m = silu(x Wgᵀ) * (x Wuᵀ) over the sorted tasks, x rows gathered in the
//             product; out[task] = m Wdᵀ (grouped_gemm.cu, grid from a host bound)
//   shared    deepseekmoe's always-on SwiGLU writes y (swiglu.cu)
//   combine   y (+)= sum over k of gate * out[t K + k] (gshard_combine.cu)
// No host synchronisation (the per-expert counts stay on the device), no allocation, no
// float atomics: graph-capturable and bitwise reproducible.
#include <cstdint>
#include <string>

#include "baselines/coarse.hpp"
#include "baselines/coarse_cuda.cuh"
#include "core/workspace.hpp"

namespace omnimoe::baselines {
namespace {

using gpu::i32;
using gpu::i64;

constexpr std::size_t kSharedChunkBytes = std::size_t{64} << 20;  // u and v of deepseekmoe's shared expert

bool has_shared(const BaselineConfig& c) { return c.kind == Kind::deepseekmoe && c.shared_width > 0; }

struct GshardGpuBuffers {
  cuda::GemmWorkspace gemm;  // router and shared-expert products
  i32* ids;                  // [T K] expert per task (-1: invalid caller id)
  float* gates;              // [T K] router gates
  gpu::ExpertSchedule sched;
  void* out;     // [T K, H] expert outputs by task
  float* logits;  // [T, N]        (phase 1: route, schedule)
  void* m;        // [T K, width]  (phase 2: experts)
  void *su, *sv;  // [rows, shared_width] (phase 3: shared expert)
  i64 shared_rows;
};

GshardGpuBuffers carve(Arena& a, const BaselineConfig& c, i64 T, DType dt) {
  const i64 H = c.hidden, W = c.width, N = c.num_experts, TK = T * c.top_k;
  const std::size_t es = dtype_size(dt);
  auto n = [](i64 v) { return static_cast<std::size_t>(v); };
  GshardGpuBuffers b{};
  b.gemm.bytes = cuda::kLayerGemmBytes;
  b.gemm.data = a.take<char>(cuda::kLayerGemmBytes);
  b.ids = a.take<i32>(n(TK));
  b.gates = a.take<float>(n(TK));
  for (int i = 0; i < 2; ++i) b.sched.vals[i] = a.take<i32>(n(TK));
  b.sched.seg = a.take<i32>(n(N + 1));
  b.sched.tiles = a.take<i32>(n(N + 1));
  b.out = a.take<char>(n(TK * H) * es);
  // Three phases that never overlap in time share one region.
  const std::size_t phase = a.mark();
  b.logits = a.take<float>(n(T * N));
  for (int i = 0; i < 2; ++i) b.sched.keys[i] = a.take<unsigned>(n(TK));
  b.sched.temp_bytes = gpu::schedule_temp_bytes(TK, N);
  b.sched.temp = a.take<char>(b.sched.temp_bytes);
  a.rewind(phase);
  b.m = a.take<char>(n(TK * W) * es);
  a.rewind(phase);
  b.shared_rows = has_shared(c) ? gpu::swiglu_chunk_rows(T, c.shared_width, dt, kSharedChunkBytes) : 0;
  b.su = a.take<char>(n(b.shared_rows * c.shared_width) * es);
  b.sv = a.take<char>(n(b.shared_rows * c.shared_width) * es);
  return b;
}

Status check_supported(const BaselineConfig& c, DType dt, i64 T) {
  const std::string kind = name(c.kind);
  if (dt != DType::f32 && dt != DType::bf16 && dt != DType::f16)
    return {StatusCode::unsupported, "device cuda: dtype " + std::string(dtype_name(dt)) + " is not supported by " +
                                         kind + " (f32, bf16, f16)"};
  if (c.hidden % 8 != 0 || c.width % 8 != 0)
    return {StatusCode::unsupported, "device cuda: " + kind + " needs config.hidden (" + std::to_string(c.hidden) +
                                         ") and config.width (" + std::to_string(c.width) +
                                         ") to be multiples of 8 (16-byte rows in the grouped products)"};
  if (c.num_experts > kCoarseMaxExperts)
    return {StatusCode::unsupported, "device cuda: " + kind + " serves config.num_experts up to " +
                                         std::to_string(kCoarseMaxExperts) + ", got " +
                                         std::to_string(c.num_experts)};
  if (T * c.top_k >= (i64{1} << 31))
    return {StatusCode::unsupported, "device cuda: T * top_k = " + std::to_string(T * c.top_k) +
                                         " must be below 2^31 (32-bit task indices)"};
  return Status::Ok();
}

Status check_aligned(const char* what, const TensorView& t) {
  if (t.defined() && reinterpret_cast<std::uintptr_t>(t.data) % 16 != 0)
    return {StatusCode::unsupported, std::string(what) + ": the CUDA coarse MoE layers need 16-byte aligned tensors"};
  return Status::Ok();
}

}  // namespace

Status gshard_workspace_size_cuda(const BaselineConfig& c, std::int64_t tokens, DType dtype, std::size_t* bytes) {
  OMNIMOE_RETURN_IF_ERROR(check_supported(c, dtype, tokens));
  Arena a;
  carve(a, c, tokens, dtype);
  *bytes = a.used();
  return Status::Ok();
}

Status gshard_forward_cuda(const ForwardArgs& a) {
  const BaselineConfig& c = *a.cfg;
  const DType dt = a.x.dtype;
  const i64 T = a.x.shape[0], H = c.hidden, W = c.width, N = c.num_experts, K = c.top_k, TK = T * K;
  OMNIMOE_RETURN_IF_ERROR(check_supported(c, dt, T));
  OMNIMOE_RETURN_IF_ERROR(check_aligned("x", a.x));
  OMNIMOE_RETURN_IF_ERROR(check_aligned("y", a.y));
  OMNIMOE_RETURN_IF_ERROR(check_aligned("params.expert_gate", a.p->expert_gate));
  OMNIMOE_RETURN_IF_ERROR(check_aligned("params.expert_up", a.p->expert_up));
  OMNIMOE_RETURN_IF_ERROR(check_aligned("params.expert_down", a.p->expert_down));
  const auto s = static_cast<cudaStream_t>(a.stream);
  Arena arena(a.ws.data, a.ws.bytes);
  GshardGpuBuffers b = carve(arena, c, T, dt);
  if (!arena.fits()) return {StatusCode::internal, "gshard cuda forward: workspace plan exceeds the queried size"};

  // route
  const float* gates = b.gates;
  if (a.ids_in.defined()) {
    OMNIMOE_RETURN_IF_ERROR(gpu::route_import_ids(a.ids_in.as<const i32>(), TK, N, b.ids, s));
    gates = a.gates_in.as<const float>();
  } else {
    cuda::GemmArgs g;
    g.tb = true;
    g.M = T;
    g.N = N;
    g.K = H;
    g.A = a.x.data;
    g.lda = H;
    g.B = a.p->router.data;
    g.ldb = H;
    g.C = b.logits;
    g.ldc = N;
    g.ab = dt;
    g.c = DType::f32;
    OMNIMOE_RETURN_IF_ERROR(cuda::gemm(g, b.gemm, s));
    const gpu::RouteArgs r{T, N, K, c.kind == Kind::gshard, b.logits, b.ids, b.gates,
                           a.ids_out.defined() ? a.ids_out.as<i32>() : nullptr};
    OMNIMOE_RETURN_IF_ERROR(gpu::route_softmax_topk(r, s));
  }

  // schedule
  OMNIMOE_RETURN_IF_ERROR(gpu::schedule_by_expert(b.ids, TK, N, b.sched, s));

  // experts: m = silu(x Wgᵀ) * (x Wuᵀ) by sorted slot, then out[task] = m Wdᵀ
  gpu::GroupedGemmArgs up{};
  up.dtype = dt;
  up.groups = N;
  up.seg = b.sched.seg;
  up.tiles = b.sched.tiles;
  up.grid_tiles = gpu::max_tiles(TK, N);
  up.a = a.x.data;
  up.lda = H;
  up.a_map = b.sched.tasks;
  up.a_div = static_cast<int>(K);
  up.b0 = a.p->expert_gate.data;
  up.b1 = a.p->expert_up.data;
  up.b_stride = W * H;
  up.ldb = H;
  up.cols = W;
  up.depth = H;
  up.c = b.m;
  up.ldc = W;
  up.c_map = nullptr;
  OMNIMOE_RETURN_IF_ERROR(gpu::grouped_gemm(up, s));
  gpu::GroupedGemmArgs down = up;
  down.a = b.m;
  down.lda = W;
  down.a_map = nullptr;
  down.a_div = 1;
  down.b0 = a.p->expert_down.data;
  down.b1 = nullptr;
  down.b_stride = H * W;
  down.ldb = W;
  down.cols = H;
  down.depth = W;
  down.c = b.out;
  down.ldc = H;
  down.c_map = b.sched.tasks;
  OMNIMOE_RETURN_IF_ERROR(gpu::grouped_gemm(down, s));

  // shared expert, then the combine onto it
  if (has_shared(c)) {
    const gpu::SwigluArgs sw{dt,        T,         H,        c.shared_width, a.x.data,      a.p->gate.data,
                             a.p->up.data, a.p->down.data, a.y.data, b.shared_rows, b.su,          b.sv,
                             b.gemm};
    OMNIMOE_RETURN_IF_ERROR(gpu::swiglu_forward(sw, s));
  }
  const gpu::CombineArgs cb{dt, T, H, K, b.ids, gates, b.out, a.y.data, has_shared(c)};
  return gpu::combine(cb, s);
}

}  // namespace omnimoe::baselines
