#include <cublasLt.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

#include "cuda/gemm.cuh"

namespace omnimoe::cuda {
namespace {

Status lt_status(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return Status::Ok();
  return {StatusCode::cuda_error, std::string(what) + ": cuBLASLt status " + std::to_string(static_cast<int>(s))};
}
#define OMNIMOE_LT_TRY(call) OMNIMOE_RETURN_IF_ERROR(lt_status((call), #call))

cudaDataType_t lt_type(DType d) {
  switch (d) {
    case DType::bf16: return CUDA_R_16BF;
    case DType::f16: return CUDA_R_16F;
    default: return CUDA_R_32F;
  }
}

// One handle per device, created on first use (outside any timed or captured region when
// the caller warms up, as the benchmark and tests do).
Status handle_for_current_device(cublasLtHandle_t* out) {
  static std::mutex mu;
  static std::map<int, cublasLtHandle_t> handles;
  int dev = 0;
  OMNIMOE_CUDA_TRY(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  auto it = handles.find(dev);
  if (it == handles.end()) {
    cublasLtHandle_t h;
    OMNIMOE_LT_TRY(cublasLtCreate(&h));
    it = handles.emplace(dev, h).first;
  }
  *out = it->second;
  return Status::Ok();
}

// RAII for the descriptors of one call.
struct Descs {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~Descs() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// Heuristic choices are cached per problem, so repeated calls (and graph capture) do no
// host-side search. This is the library's heuristic, not timing-based autotuning.
using Key = std::tuple<int, bool, bool, i64, i64, i64, i64, i64, i64, int, int, bool, int, i64, i64, i64, std::uint32_t,
                       std::uint32_t, std::uint32_t, std::size_t>;

// Largest power of two (up to 256) dividing an address or a byte count.
std::uint32_t alignment_of(std::uintptr_t a) {
  std::uint32_t al = 256;
  while (al > 1 && a % al != 0) al >>= 1;
  return al;
}

// What cuBLASLt may assume of every batch's operand: batch i starts at p + i * stride
// elements, so it is as aligned as both p and the stride in bytes (a stride of 0 broadcasts
// p). Telling batch 0's alignment alone would let a 256-byte aligned batch 0 vouch for a
// batch 1 that is only 16-byte aligned.
std::uint32_t operand_alignment(const void* p, int batch, i64 stride, DType d) {
  std::uint32_t al = alignment_of(reinterpret_cast<std::uintptr_t>(p));
  if (batch > 1 && stride != 0)
    al = std::min(al, alignment_of(static_cast<std::uintptr_t>(stride < 0 ? -stride : stride) * dtype_size(d)));
  return al;
}

}  // namespace

Status gemm(const GemmArgs& g, GemmWorkspace ws, cudaStream_t stream) {
  if (g.M == 0 || g.N == 0) return Status::Ok();
  cublasLtHandle_t handle;
  OMNIMOE_RETURN_IF_ERROR(handle_for_current_device(&handle));
  // Row-major C = op(A) op(B) is column-major Cᵀ = op(B)ᵀ op(A)ᵀ: swap the operands.
  const cublasOperation_t opA = g.tb ? CUBLAS_OP_T : CUBLAS_OP_N;  // applied to B (row-major)
  const cublasOperation_t opB = g.ta ? CUBLAS_OP_T : CUBLAS_OP_N;  // applied to A (row-major)
  const i64 m = g.N, n = g.M, k = g.K;
  const cudaDataType_t tab = lt_type(g.ab), tc = lt_type(g.c);
  const cublasComputeType_t compute = CUBLAS_COMPUTE_32F;

  Descs d;
  OMNIMOE_LT_TRY(cublasLtMatmulDescCreate(&d.op, compute, CUDA_R_32F));
  OMNIMOE_LT_TRY(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &opA, sizeof(opA)));
  OMNIMOE_LT_TRY(cublasLtMatmulDescSetAttribute(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &opB, sizeof(opB)));
  // Stored (column-major) shapes of the two operands before their op.
  OMNIMOE_LT_TRY(cublasLtMatrixLayoutCreate(&d.a, tab, opA == CUBLAS_OP_N ? m : k, opA == CUBLAS_OP_N ? k : m, g.ldb));
  OMNIMOE_LT_TRY(cublasLtMatrixLayoutCreate(&d.b, tab, opB == CUBLAS_OP_N ? k : n, opB == CUBLAS_OP_N ? n : k, g.lda));
  OMNIMOE_LT_TRY(cublasLtMatrixLayoutCreate(&d.c, tc, m, n, g.ldc));
  if (g.batch > 1) {
    const int32_t count = g.batch;
    const int64_t sa = g.stride_b, sb = g.stride_a, sc = g.stride_c;  // operands are swapped
    for (auto [layout, stride] : {std::pair{d.a, sa}, std::pair{d.b, sb}, std::pair{d.c, sc}}) {
      OMNIMOE_LT_TRY(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
      OMNIMOE_LT_TRY(cublasLtMatrixLayoutSetAttribute(layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride,
                                                      sizeof(stride)));
    }
  }

  int dev = 0;
  OMNIMOE_CUDA_TRY(cudaGetDevice(&dev));
  const std::uint32_t al_a = operand_alignment(g.A, g.batch, g.stride_a, g.ab);
  const std::uint32_t al_b = operand_alignment(g.B, g.batch, g.stride_b, g.ab);
  const std::uint32_t al_c = operand_alignment(g.C, g.batch, g.stride_c, g.c);
  // clang-format off
  const Key key{dev, g.ta, g.tb, g.M, g.N, g.K, g.lda, g.ldb, g.ldc, static_cast<int>(g.ab), static_cast<int>(g.c),
                g.beta != 0.f, g.batch, g.stride_a, g.stride_b, g.stride_c, al_a, al_b, al_c,
                ws.bytes};  // the algorithm must fit the scratch
  // clang-format on
  static std::mutex mu;
  static std::map<Key, cublasLtMatmulAlgo_t> cache;
  cublasLtMatmulAlgo_t algo;
  bool found = false;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) {
      algo = it->second;
      found = true;
    }
  }
  if (!found) {
    OMNIMOE_LT_TRY(cublasLtMatmulPreferenceCreate(&d.pref));
    std::size_t cap = ws.bytes;
    OMNIMOE_LT_TRY(cublasLtMatmulPreferenceSetAttribute(d.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &cap,
                                                        sizeof(cap)));
    // The heuristic may otherwise assume 256-byte aligned operands; chunk offsets and views
    // into larger buffers can be less aligned.
    const std::uint32_t al[4] = {al_b, al_a, al_c, al_c};  // operands are swapped
    const cublasLtMatmulPreferenceAttributes_t attr[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; ++i)
      OMNIMOE_LT_TRY(cublasLtMatmulPreferenceSetAttribute(d.pref, attr[i], &al[i], sizeof(al[i])));
    cublasLtMatmulHeuristicResult_t result{};
    int count = 0;
    OMNIMOE_LT_TRY(cublasLtMatmulAlgoGetHeuristic(handle, d.op, d.a, d.b, d.c, d.c, d.pref, 1, &result, &count));
    if (count < 1) return {StatusCode::cuda_error, "cuBLASLt: no algorithm for this product"};
    algo = result.algo;
    std::lock_guard<std::mutex> lock(mu);
    cache.emplace(key, algo);
  }
  OMNIMOE_LT_TRY(cublasLtMatmul(handle, d.op, &g.alpha, g.B, d.a, g.A, d.b, &g.beta, g.C, d.c, g.C, d.c, &algo,
                                ws.data, ws.bytes, stream));
  return Status::Ok();
}

}  // namespace omnimoe::cuda
