// CUDA backend stand-in for builds without a CUDA toolkit: every call says so.
#include "core/backend.hpp"

namespace omnimoe::cuda {
namespace {
Status no_cuda() {
  return {StatusCode::unsupported, "device cuda: this build of omnimoe has no CUDA backend (no CUDA toolkit was found)"};
}
}  // namespace
bool built() { return false; }
Status forward_workspace_size(const Config&, std::int64_t, DType, bool, std::size_t*) { return no_cuda(); }
Status backward_workspace_size(const Config&, std::int64_t, DType, std::size_t*) { return no_cuda(); }
Status forward(const Config&, Mode, const TensorView&, const Params&, const ForwardOutputs&, Workspace, void*) {
  return no_cuda();
}
Status backward(const Config&, Mode, const TensorView&, const Params&, const TensorView&, const TensorView&,
                const Gradients&, Workspace, void*, const SparseExpertGradients*) {
  return no_cuda();
}
Status forward_routed(const Config&, const TensorView&, const Params&, const TensorView&, const TensorView&,
                      const TensorView&, Workspace, void*) {
  return no_cuda();
}
Schedule experts_schedule(const Config&, std::int64_t, DType, bool) { return Schedule::automatic; }
}  // namespace omnimoe::cuda

#include "omnimoe/device.hpp"
namespace omnimoe {
Status measure_ceilings(Device, double*, double*) {
  return {StatusCode::unsupported, "measure_ceilings: this build of omnimoe has no CUDA backend"};
}
Status measure_l2_gather_rate(Device, double*) {
  return {StatusCode::unsupported, "measure_l2_gather_rate: this build of omnimoe has no CUDA backend"};
}
Status time_dense_equivalent(const Config&, std::int64_t, DType, int, double*) {
  return {StatusCode::unsupported, "time_dense_equivalent: this build of omnimoe has no CUDA backend"};
}
}  // namespace omnimoe
