// Side streams: one per (host thread, device), created on first use.
#include <cstdlib>
#include <cstring>
#include <map>

#include "cuda/side_stream.cuh"

namespace omnimoe::cuda {
namespace {

struct ThreadSideStreams {
  std::map<int, SideStream> by_device;
  ~ThreadSideStreams() {
    // At process exit the runtime may already be gone; the errors are of no consequence.
    for (auto& [dev, s] : by_device) {
      if (cudaSetDevice(dev) != cudaSuccess) continue;
      cudaEventDestroy(s.fork);
      cudaEventDestroy(s.join);
      cudaStreamDestroy(s.stream);
    }
  }
};

Status create(SideStream* s) {
  int least = 0, greatest = 0;
  OMNIMOE_CUDA_TRY(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  OMNIMOE_CUDA_TRY(cudaStreamCreateWithPriority(&s->stream, cudaStreamNonBlocking, greatest));
  OMNIMOE_CUDA_TRY(cudaEventCreateWithFlags(&s->fork, cudaEventDisableTiming));
  OMNIMOE_CUDA_TRY(cudaEventCreateWithFlags(&s->join, cudaEventDisableTiming));
  return Status::Ok();
}

}  // namespace

Status side_stream_for_current_device(SideStream* out) {
  thread_local ThreadSideStreams streams;
  int dev = 0;
  OMNIMOE_CUDA_TRY(cudaGetDevice(&dev));
  auto it = streams.by_device.find(dev);
  if (it == streams.by_device.end()) {
    SideStream s;
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    OMNIMOE_CUDA_TRY(cudaThreadExchangeStreamCaptureMode(&mode));
    const Status st = create(&s);
    OMNIMOE_CUDA_TRY(cudaThreadExchangeStreamCaptureMode(&mode));
    if (!st.ok()) {
      if (s.fork) cudaEventDestroy(s.fork);
      if (s.stream) cudaStreamDestroy(s.stream);
      return st;
    }
    it = streams.by_device.emplace(dev, s).first;
  }
  *out = it->second;
  return Status::Ok();
}

Status fork_side(cudaStream_t main, const SideStream& side, bool* forked) {
  cudaStreamCaptureStatus side_status = cudaStreamCaptureStatusNone, main_status = cudaStreamCaptureStatusNone;
  unsigned long long side_id = 0, main_id = 0;
  OMNIMOE_CUDA_TRY(cudaStreamGetCaptureInfo(side.stream, &side_status, &side_id));
  OMNIMOE_CUDA_TRY(cudaStreamGetCaptureInfo(main, &main_status, &main_id));
  *forked = side_status == cudaStreamCaptureStatusNone ||
            (main_status == cudaStreamCaptureStatusActive && side_status == cudaStreamCaptureStatusActive &&
             main_id == side_id);
  if (!*forked) return Status::Ok();
  OMNIMOE_CUDA_TRY(cudaEventRecord(side.fork, main));
  OMNIMOE_CUDA_TRY(cudaStreamWaitEvent(side.stream, side.fork, 0));
  return Status::Ok();
}

Status join_side(cudaStream_t main, const SideStream& side) {
  OMNIMOE_CUDA_TRY(cudaEventRecord(side.join, side.stream));
  OMNIMOE_CUDA_TRY(cudaStreamWaitEvent(main, side.join, 0));
  return Status::Ok();
}

bool overlap_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("OMNIMOE_OVERLAP");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return on;
}

}  // namespace omnimoe::cuda
