// The CUDA half of include/omnimoe/device.hpp (tools, tests and benchmarks only).
#include <algorithm>
#include <atomic>

#include "core/device_cuda.hpp"
#include "cuda/common.cuh"

namespace omnimoe {

bool cuda_device_present() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

std::string cuda_device_description() {
  int dev = 0;
  cudaDeviceProp prop{};
  if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess) return "no CUDA device";
  return std::string(prop.name) + " (" + std::to_string(prop.multiProcessorCount) + " SMs, " +
         std::to_string(prop.l2CacheSize >> 20) + " MB L2)";
}

Status cuda_device_alloc(std::size_t bytes, void** ptr) {
  *ptr = nullptr;
  if (bytes == 0) return Status::Ok();
  OMNIMOE_CUDA_TRY(cudaMalloc(ptr, bytes));
  return Status::Ok();
}

void cuda_device_free(void* ptr) {
  if (ptr) cudaFree(ptr);
}

Status cuda_copy_bytes(void* dst, Device dst_dev, const void* src, Device src_dev, std::size_t bytes) {
  (void)dst_dev;
  (void)src_dev;
  OMNIMOE_CUDA_TRY(cudaMemcpy(dst, src, bytes, cudaMemcpyDefault));
  return Status::Ok();
}

Status cuda_fill_bytes(void* dst, int byte, std::size_t bytes) {
  OMNIMOE_CUDA_TRY(cudaMemset(dst, byte, bytes));
  OMNIMOE_CUDA_TRY(cudaDeviceSynchronize());
  return Status::Ok();
}

Status cuda_synchronize() {
  OMNIMOE_CUDA_TRY(cudaDeviceSynchronize());
  return Status::Ok();
}

namespace {
std::atomic<std::size_t> g_base_used{0}, g_peak_used{0};
std::size_t used_now() {
  std::size_t free = 0, total = 0;
  if (cudaMemGetInfo(&free, &total) != cudaSuccess) return 0;
  return total - free;
}
}  // namespace

void cuda_reset_peak_memory() {
  g_base_used = used_now();
  g_peak_used = g_base_used.load();
}

std::size_t cuda_peak_memory_bytes() { return g_peak_used.load(); }

Status cuda_time_calls(const std::function<Status()>& fn, int warmup, int reps, std::vector<double>* ms) {
  for (int i = 0; i < warmup; ++i) OMNIMOE_RETURN_IF_ERROR(fn());
  OMNIMOE_CUDA_TRY(cudaDeviceSynchronize());
  cudaEvent_t start, stop;
  OMNIMOE_CUDA_TRY(cudaEventCreate(&start));
  OMNIMOE_CUDA_TRY(cudaEventCreate(&stop));
  ms->clear();
  Status st;
  for (int i = 0; i < reps && st.ok(); ++i) {
    cudaEventRecord(start, nullptr);
    st = fn();
    cudaEventRecord(stop, nullptr);
    if (st.ok()) st = cuda::cuda_status(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float t = 0;
    if (st.ok()) st = cuda::cuda_status(cudaEventElapsedTime(&t, start, stop), "cudaEventElapsedTime");
    ms->push_back(t);
    const std::size_t u = used_now();
    std::size_t prev = g_peak_used.load();
    while (u > prev && !g_peak_used.compare_exchange_weak(prev, u)) {
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return st;
}

Status cuda_time_graph_replays(const std::vector<std::function<Status(void*)>>& calls, int warmup, int reps,
                               std::vector<double>* ms) {
  cudaStream_t s;
  OMNIMOE_CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  std::vector<cudaGraphExec_t> execs;
  Status st;
  for (const auto& call : calls) {  // one eager run first: handles and heuristics are host-side set-up
    st = call(s);
    if (!st.ok()) break;
  }
  if (st.ok()) st = cuda::cuda_status(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  for (std::size_t i = 0; st.ok() && i < calls.size(); ++i) {
    cudaGraph_t g = nullptr;
    st = cuda::cuda_status(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    if (!st.ok()) break;
    const Status inner = calls[i](s);
    st = cuda::cuda_status(cudaStreamEndCapture(s, &g), "cudaStreamEndCapture");
    if (st.ok()) st = inner;
    cudaGraphExec_t e = nullptr;
    if (st.ok()) st = cuda::cuda_status(cudaGraphInstantiate(&e, g, 0), "cudaGraphInstantiate");
    if (g) cudaGraphDestroy(g);
    if (st.ok()) execs.push_back(e);
  }
  cudaEvent_t a = nullptr, b = nullptr;
  if (st.ok()) st = cuda::cuda_status(cudaEventCreate(&a), "cudaEventCreate");
  if (st.ok()) st = cuda::cuda_status(cudaEventCreate(&b), "cudaEventCreate");
  ms->clear();
  for (int i = 0; st.ok() && i < warmup + reps; ++i) {
    cudaEventRecord(a, s);
    st = cuda::cuda_status(cudaGraphLaunch(execs[i % execs.size()], s), "cudaGraphLaunch");
    cudaEventRecord(b, s);
    if (st.ok()) st = cuda::cuda_status(cudaEventSynchronize(b), "cudaEventSynchronize");
    float t = 0;
    if (st.ok()) st = cuda::cuda_status(cudaEventElapsedTime(&t, a, b), "cudaEventElapsedTime");
    if (st.ok() && i >= warmup) ms->push_back(t);
  }
  for (auto e : execs) cudaGraphExecDestroy(e);
  if (a) cudaEventDestroy(a);
  if (b) cudaEventDestroy(b);
  cudaStreamDestroy(s);
  return st;
}

}  // namespace omnimoe
