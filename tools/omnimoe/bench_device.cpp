#include "bench_device.hpp"

#include <cblas.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "omnimoe/device.hpp"
#include "tensors.hpp"

namespace omnimoe::tool {
namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double best_ms(const std::function<void()>& fn, int reps) {
  std::vector<double> ms;
  throw_if_error(time_calls(Device::cpu, [&] { fn(); return Status::Ok(); }, 1, reps, &ms));
  return *std::min_element(ms.begin(), ms.end());
}

// C[M,N] = A[M,K] B[N,K]^T, row-major: the layout of every product of the layer.
void sgemm_nt(std::int64_t M, std::int64_t N, std::int64_t K, const float* A, const float* B, float* C) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
              1.0f, A, static_cast<int>(K), B, static_cast<int>(K), 0.0f, C, static_cast<int>(N));
}

Ceilings cpu_ceilings() {
  Ceilings c;
  // A square product large enough to reach BLAS's steady rate, small enough for ~0.1 s.
  constexpr std::int64_t n = 1024;
  Tensor a(DType::f32, Device::cpu, {n, n}), b(DType::f32, Device::cpu, {n, n}), out(DType::f32, Device::cpu, {n, n});
  fill_uniform(a.view(), 1, -1, 1);
  fill_uniform(b.view(), 2, -1, 1);
  const float *pa = a.view().as<float>(), *pb = b.view().as<float>();
  const double gemm_ms = best_ms([&] { sgemm_nt(n, n, n, pa, pb, out.view().as<float>()); }, 3);
  c.flops_per_s = 2.0 * n * n * n / (gemm_ms * 1e-3);
  // A copy well beyond the last-level cache.
  constexpr std::size_t bytes = std::size_t{256} << 20;
  Buffer src(Device::cpu, bytes), dst(Device::cpu, bytes);
  std::memset(src.data(), 1, bytes);
  std::memset(dst.data(), 0, bytes);
  const double copy_ms = best_ms([&] { std::memcpy(dst.data(), src.data(), bytes); }, 3);
  c.bytes_per_s = 2.0 * static_cast<double>(bytes) / (copy_ms * 1e-3);
  return c;
}

Ceilings cuda_ceilings(DType dtype) {
  // The library measures a bf16 tensor-core rate, which is no ceiling for f32 or f64 layers.
  if (dtype != DType::bf16 && dtype != DType::f16) return {};
  Ceilings c;
  if (Status s = omnimoe::measure_ceilings(Device::cuda, &c.flops_per_s, &c.bytes_per_s); !s.ok()) {
    std::fprintf(stderr, "omnimoe: no device ceilings, floor and ratio left empty: %s\n", s.message().c_str());
    return {};
  }
  if (Status s = omnimoe::measure_l2_gather_rate(Device::cuda, &c.l2_gather_bytes_per_s); !s.ok())
    std::fprintf(stderr, "omnimoe: no L2 gather rate: %s\n", s.message().c_str());
  return c;
}

}  // namespace

Ceilings bench_ceilings(Device device, DType dtype) {
  return device == Device::cpu ? cpu_ceilings() : cuda_ceilings(dtype);
}

int input_sets(Device device, std::int64_t bytes_per_set) {
  if (device == Device::cpu) return 1;
  // Enough x sets that together they exceed twice the largest L2 of the GPUs we time
  // (H200: 60 MB), so a timed call never finds its input left in cache by the previous.
  constexpr std::int64_t kTwiceL2 = std::int64_t{120} << 20;
  return static_cast<int>(std::clamp<std::int64_t>((kTwiceL2 + bytes_per_set - 1) / bytes_per_set, 2, 64));
}

RandomRouting random_routing(const Config& cfg, std::int64_t T, DType dtype, Device device, std::uint64_t seed) {
  // Uniform random distinct experts per token and random positive gates, made on the host.
  const std::int64_t K = cfg.top_k, N = cfg.num_experts();
  Tensor ids(DType::i32, Device::cpu, {T, K}), gates(accumulation_dtype(dtype), Device::cpu, {T, K});
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> g(0.01, 1.0);
  std::vector<std::int64_t> chosen;
  for (std::int64_t t = 0; t < T; ++t) {
    chosen.clear();
    while (static_cast<std::int64_t>(chosen.size()) < K) {  // rejection: K << N in every suite
      const auto e = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(N));
      if (std::find(chosen.begin(), chosen.end(), e) == chosen.end()) chosen.push_back(e);
    }
    for (std::int64_t k = 0; k < K; ++k) {
      ids.view().as<std::int32_t>()[t * K + k] = static_cast<std::int32_t>(chosen[k]);
      const double v = g(rng);
      convert(&v, DType::f64, static_cast<char*>(gates.view().data) + (t * K + k) * dtype_size(gates.view().dtype),
              gates.view().dtype, 1);
    }
  }
  return {convert_tensor(ids.view(), DType::i32, device), convert_tensor(gates.view(), gates.view().dtype, device)};
}

double shared_mlp_gemm_ms(const float* x, const float* gate, const float* up, const float* down, std::int64_t T,
                          std::int64_t H, std::int64_t I, int warmup, int reps) {
  Tensor g(DType::f32, Device::cpu, {T, I}), u(DType::f32, Device::cpu, {T, I}), y(DType::f32, Device::cpu, {T, H});
  float *gp = g.view().as<float>(), *up_out = u.view().as<float>(), *yp = y.view().as<float>();
  std::vector<double> ms;
  throw_if_error(time_calls(
      Device::cpu,
      [&] {
        sgemm_nt(T, I, H, x, gate, gp);
        sgemm_nt(T, I, H, x, up, up_out);
        sgemm_nt(T, H, I, gp, down, yp);  // g stands in for m = silu(g) * u: same shapes, same cost
        return Status::Ok();
      },
      warmup, reps, &ms));
  return median(ms);
}

}  // namespace omnimoe::tool
