// include/omnimoe/device.hpp: the CPU side here, the CUDA side behind core/device_cuda.hpp.
#include "omnimoe/device.hpp"

#include <omp.h>

#include <chrono>
#include <cstdlib>
#include <cstring>

#include "core/backend.hpp"
#include "core/device_cuda.hpp"

namespace omnimoe {
namespace {
constexpr std::size_t kHostAlign = 256;  // same as the workspace arena: AVX and cache-line friendly
}  // namespace

bool cuda_available() { return cuda::built() && cuda_device_present(); }

std::string device_description(Device d) {
  if (d == Device::cuda) return "cuda: " + cuda_device_description();
  return "cpu: " + std::to_string(omp_get_max_threads()) + " threads";
}

Status device_alloc(Device d, std::size_t bytes, void** ptr) {
  *ptr = nullptr;
  if (d == Device::cuda) return cuda_device_alloc(bytes, ptr);
  // aligned_alloc needs a multiple of the alignment; a zero-byte request still gets a
  // distinct non-null pointer, because a null data pointer means "absent" to a TensorView.
  std::size_t rounded = (bytes + kHostAlign - 1) / kHostAlign * kHostAlign;
  if (rounded == 0) rounded = kHostAlign;
  *ptr = std::aligned_alloc(kHostAlign, rounded);
  if (*ptr == nullptr)
    return {StatusCode::invalid_argument,
            "device_alloc: cannot allocate " + std::to_string(bytes) + " bytes of host memory"};
  return Status::Ok();
}

void device_free(Device d, void* ptr) {
  if (ptr == nullptr) return;
  if (d == Device::cuda) {
    cuda_device_free(ptr);
  } else {
    std::free(ptr);
  }
}

Status copy_bytes(void* dst, Device dst_dev, const void* src, Device src_dev, std::size_t bytes) {
  if (bytes == 0) return Status::Ok();
  if (dst_dev == Device::cpu && src_dev == Device::cpu) {
    std::memmove(dst, src, bytes);
    return Status::Ok();
  }
  return cuda_copy_bytes(dst, dst_dev, src, src_dev, bytes);
}

Status fill_bytes(void* dst, Device d, int byte, std::size_t bytes) {
  if (bytes == 0) return Status::Ok();
  if (d == Device::cuda) return cuda_fill_bytes(dst, byte, bytes);
  std::memset(dst, byte, bytes);
  return Status::Ok();
}

Status synchronize(Device d) { return d == Device::cuda ? cuda_synchronize() : Status::Ok(); }

Status time_calls(Device d, const std::function<Status()>& fn, int warmup, int reps, std::vector<double>* ms) {
  if (warmup < 0 || reps < 1) return invalid_argument("time_calls: need warmup >= 0 and reps >= 1");
  ms->clear();
  if (d == Device::cuda) return cuda_time_calls(fn, warmup, reps, ms);
  for (int i = 0; i < warmup; ++i) OMNIMOE_RETURN_IF_ERROR(fn());
  ms->reserve(static_cast<std::size_t>(reps));
  for (int i = 0; i < reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    OMNIMOE_RETURN_IF_ERROR(fn());
    auto t1 = std::chrono::steady_clock::now();
    ms->push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
  }
  return Status::Ok();
}

Status time_graph_replays(Device d, const std::vector<std::function<Status(void*)>>& calls, int warmup, int reps,
                          std::vector<double>* ms) {
  if (calls.empty() || warmup < 0 || reps < 1) return invalid_argument("time_graph_replays: need calls, warmup >= 0, reps >= 1");
  if (d == Device::cuda) return cuda_time_graph_replays(calls, warmup, reps, ms);
  std::size_t next = 0;
  return time_calls(d, [&] { return calls[next++ % calls.size()](nullptr); }, warmup, reps, ms);
}

void reset_peak_memory(Device d) {
  if (d == Device::cuda) cuda_reset_peak_memory();
}

std::size_t peak_memory_bytes(Device d) { return d == Device::cuda ? cuda_peak_memory_bytes() : 0; }

}  // namespace omnimoe
