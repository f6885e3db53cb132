// The auxiliary stream the forward forks the shared MLP onto. Created on first use per
// device and host thread (outside any timed or captured region when the caller warms up,
// as for the cuBLASLt handle) and kept for the life of the process: the forward itself
// creates nothing. Event record / wait forks and joins it, which CUDA graph capture follows.
#include <map>

#include "cuda/cuda.cuh"

namespace omnimoe::cuda {

Status aux_stream(AuxStream* out) {
  thread_local std::map<int, AuxStream> per_device;
  int dev = 0;
  OMNIMOE_CUDA_TRY(cudaGetDevice(&dev));
  auto it = per_device.find(dev);
  if (it == per_device.end()) {
    AuxStream a{};
    OMNIMOE_CUDA_TRY(cudaStreamCreateWithFlags(&a.stream, cudaStreamNonBlocking));
    OMNIMOE_CUDA_TRY(cudaEventCreateWithFlags(&a.fork, cudaEventDisableTiming));
    OMNIMOE_CUDA_TRY(cudaEventCreateWithFlags(&a.join, cudaEventDisableTiming));
    it = per_device.emplace(dev, a).first;
  }
  *out = it->second;
  return Status::Ok();
}

}  // namespace omnimoe::cuda
