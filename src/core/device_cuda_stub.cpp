// Stand-in for cuda/device.cu in builds without a CUDA toolkit: no device is ever present,
// and every operation on one says why it cannot be served.
#include "core/device_cuda.hpp"

namespace omnimoe {
namespace {
Status no_cuda() { return {StatusCode::unsupported, "device cuda: omnimoe was built without CUDA"}; }
}  // namespace

bool cuda_device_present() { return false; }
std::string cuda_device_description() { return "none (omnimoe was built without CUDA)"; }
Status cuda_device_alloc(std::size_t, void** ptr) {
  *ptr = nullptr;
  return no_cuda();
}
void cuda_device_free(void*) {}
Status cuda_copy_bytes(void*, Device, const void*, Device, std::size_t) { return no_cuda(); }
Status cuda_fill_bytes(void*, int, std::size_t) { return no_cuda(); }
Status cuda_synchronize() { return no_cuda(); }
Status cuda_time_calls(const std::function<Status()>&, int, int, std::vector<double>*) { return no_cuda(); }
Status cuda_time_graph_replays(const std::vector<std::function<Status(void*)>>&, int, int, std::vector<double>*) {
  return no_cuda();
}
void cuda_reset_peak_memory() {}
std::size_t cuda_peak_memory_bytes() { return 0; }

}  // namespace omnimoe
