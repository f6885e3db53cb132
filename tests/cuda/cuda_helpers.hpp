// Device copies of the host test tensors (tests/cpu/test_helpers.hpp), through the public
// device utilities, so CUDA tests build their problems exactly as the CPU tests do.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/backend.hpp"
#include "cpu/test_helpers.hpp"
#include "omnimoe/device.hpp"

namespace omt {

// Owns device memory mirroring a HostTensor's dtype and shape.
class DeviceTensor {
 public:
  DeviceTensor() = default;
  explicit DeviceTensor(const HostTensor& h) : host_shape_(h) {
    if (!h.defined()) return;
    EXPECT_TRUE(device_alloc(Device::cuda, h.bytes() + 1, &ptr_).ok());
    EXPECT_TRUE(copy_bytes(ptr_, Device::cuda, h.data(), Device::cpu, h.bytes()).ok());
  }
  ~DeviceTensor() { device_free(Device::cuda, ptr_); }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;

  TensorView view() const {
    TensorView v = host_shape_.view();
    if (!v.defined()) return v;
    v.data = ptr_;
    v.device = Device::cuda;
    return v;
  }
  void upload(const HostTensor& h) { ASSERT_TRUE(copy_bytes(ptr_, Device::cuda, h.data(), Device::cpu, h.bytes()).ok()); }
  void download(HostTensor& h) const { ASSERT_TRUE(copy_bytes(h.data(), Device::cpu, ptr_, Device::cuda, h.bytes()).ok()); }
  void poison() {
    if (ptr_) ASSERT_TRUE(fill_bytes(ptr_, Device::cuda, 0xFF, host_shape_.bytes()).ok());
  }

 private:
  HostTensor host_shape_;  // dtype and shape (and the initial contents)
  void* ptr_ = nullptr;
};

struct DeviceProblem {
  DeviceTensor x, router_row, router_col, expert_in, expert_out, gate, up, down;
  DeviceTensor running_mean_row, running_var_row, running_mean_col, running_var_col;
  explicit DeviceProblem(const Problem& p)
      : x(p.x), router_row(p.router_row), router_col(p.router_col), expert_in(p.expert_in), expert_out(p.expert_out),
        gate(p.gate), up(p.up), down(p.down), running_mean_row(p.running_mean_row), running_var_row(p.running_var_row),
        running_mean_col(p.running_mean_col), running_var_col(p.running_var_col) {}
  Params params() const {
    Params q;
    q.router_row = router_row.view();
    q.router_col = router_col.view();
    q.expert_in = expert_in.view();
    q.expert_out = expert_out.view();
    q.gate = gate.view();
    q.up = up.view();
    q.down = down.view();
    q.running_mean_row = running_mean_row.view();
    q.running_var_row = running_var_row.view();
    q.running_mean_col = running_mean_col.view();
    q.running_var_col = running_var_col.view();
    return q;
  }
};

struct DeviceOutputs {
  DeviceTensor y, ids, scores, gates;
  explicit DeviceOutputs(const Outputs& o) : y(o.y), ids(o.ids), scores(o.scores), gates(o.gates) {}
  ForwardOutputs view() const {
    ForwardOutputs o;
    o.y = y.view();
    o.expert_ids = ids.view();
    o.scores = scores.view();
    o.gates = gates.view();
    return o;
  }
  void poison() {
    y.poison();
    ids.poison();
    scores.poison();
    gates.poison();
  }
  void download(Outputs& o) const {
    y.download(o.y);
    ids.download(o.ids);
    if (o.scores.defined()) scores.download(o.scores);
    if (o.gates.defined()) gates.download(o.gates);
  }
};

// Device workspace poisoned with 0xFF (the layer must not rely on its contents).
class DeviceWorkspace {
 public:
  explicit DeviceWorkspace(std::size_t bytes) : bytes_(bytes) {
    EXPECT_TRUE(device_alloc(Device::cuda, std::max<std::size_t>(bytes, 1), &ptr_).ok());
    EXPECT_TRUE(fill_bytes(ptr_, Device::cuda, 0xFF, bytes).ok());
  }
  ~DeviceWorkspace() { device_free(Device::cuda, ptr_); }
  Workspace ws() const { return Workspace{ptr_, bytes_}; }
  void poison() { ASSERT_TRUE(fill_bytes(ptr_, Device::cuda, 0xFF, bytes_).ok()); }

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

// Device copies of host tensors placed one element past a 256-byte boundary (misaligned for
// 16-byte access), freed with the object: views as a caller's slice of a larger buffer.
class MisalignedCopies {
 public:
  MisalignedCopies() = default;
  MisalignedCopies(const MisalignedCopies&) = delete;
  MisalignedCopies& operator=(const MisalignedCopies&) = delete;
  ~MisalignedCopies() {
    for (void* b : blocks_) cudaFree(b);
  }
  TensorView copy(const HostTensor& h) {
    void* base = nullptr;
    EXPECT_EQ(cudaMalloc(&base, h.bytes() + 256), cudaSuccess);
    blocks_.push_back(base);
    void* at = static_cast<char*>(base) + dtype_size(h.dtype());
    EXPECT_EQ(cudaMemcpy(at, h.data(), h.bytes(), cudaMemcpyHostToDevice), cudaSuccess);
    TensorView v = h.view();
    v.data = at;
    v.device = Device::cuda;
    return v;
  }
  static void download(const TensorView& v, HostTensor& h) {
    ASSERT_EQ(cudaMemcpy(h.data(), v.data, h.bytes(), cudaMemcpyDeviceToHost), cudaSuccess);
  }

 private:
  std::vector<void*> blocks_;
};

inline bool have_gpu() { return cuda_available(); }

// Sets an environment variable (value nullptr: unsets it) for a scope, then puts back what
// was there, also when an assertion returns early: the tests' way to force a library switch.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    if (value != nullptr)
      setenv(name, value, 1);
    else
      unsetenv(name);
  }
  ~ScopedEnv() {
    if (had_)
      setenv(name_, old_.c_str(), 1);
    else
      unsetenv(name_);
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  bool had_ = false;
  std::string old_;
};

// A caller's routing [T, K] (i64): K distinct uniform random experts of N per token.
inline HostTensor random_distinct_ids(std::int64_t T, std::int64_t K, std::int64_t N, std::mt19937_64& rng) {
  HostTensor ids(DType::i64, {T, K});
  std::vector<std::int64_t> perm(static_cast<std::size_t>(N));
  for (std::int64_t t = 0; t < T; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (std::int64_t k = 0; k < K; ++k) ids.set(t * K + k, static_cast<double>(perm[k]));
  }
  return ids;
}

// The config.schedule cases: the config must take the experts path `want` in the pass named
// (forward, or the backward with its own rule), and the automatic rule must not (else the
// case would not show that the config decides). Host code: checked with or without a GPU.
inline constexpr Schedule kExpert = Schedule::expert_centric, kToken = Schedule::token_centric;
inline ::testing::AssertionResult schedule_decides_path(Config cfg, std::int64_t T, DType dtype, Schedule want,
                                                        bool backward) {
  if (omnimoe::cuda::experts_schedule(cfg, T, dtype, backward) != want)
    return ::testing::AssertionFailure() << "config.schedule ignored";
  cfg.schedule = Schedule::automatic;
  if (omnimoe::cuda::experts_schedule(cfg, T, dtype, backward) == want)
    return ::testing::AssertionFailure()
           << "the automatic rule takes this path anyway: the case would not show that the config decides";
  return ::testing::AssertionSuccess();
}

}  // namespace omt
