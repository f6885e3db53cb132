// Public entry points: validate, then dispatch to the backend of x's device.
#include "omnimoe/layer.hpp"

#include <algorithm>

#include "core/backend.hpp"
#include "core/validate.hpp"

namespace omnimoe {

DType accumulation_dtype(DType layer_dtype) { return layer_dtype == DType::f64 ? DType::f64 : DType::f32; }

namespace {
Status check_request(const Config& cfg, std::int64_t tokens, DType dtype) {
  OMNIMOE_RETURN_IF_ERROR(validate(cfg));
  if (tokens < 1 || tokens >= (std::int64_t{1} << 31)) return invalid_argument("tokens: must be in [1, 2^31)");
  if (!dtype_is_float(dtype)) return invalid_argument(std::string("dtype: ") + dtype_name(dtype) + " is not a float dtype");
  return Status::Ok();
}
}  // namespace

Status forward_workspace_size(const Config& cfg, std::int64_t tokens, DType dtype, Device device, std::size_t* bytes) {
  return forward_workspace_size(cfg, tokens, dtype, device, DType::i64, bytes);
}

Status forward_workspace_size(const Config& cfg, std::int64_t tokens, DType dtype, Device device, DType ids,
                              std::size_t* bytes) {
  OMNIMOE_RETURN_IF_ERROR(check_request(cfg, tokens, dtype));
  if (ids != DType::i32 && ids != DType::i64)
    return invalid_argument(std::string("ids: expert ids are i32 or i64, not ") + dtype_name(ids));
  if (device == Device::cpu) {
    *bytes = cpu::forward_workspace_size(cfg, tokens, dtype);
    return Status::Ok();
  }
  return cuda::forward_workspace_size(cfg, tokens, dtype, ids == DType::i32, bytes);
}

Status backward_workspace_size(const Config& cfg, std::int64_t tokens, DType dtype, Device device, std::size_t* bytes) {
  OMNIMOE_RETURN_IF_ERROR(check_request(cfg, tokens, dtype));
  if (device == Device::cpu) {
    *bytes = cpu::backward_workspace_size(cfg, tokens, dtype);
    return Status::Ok();
  }
  return cuda::backward_workspace_size(cfg, tokens, dtype, bytes);
}

// Training-mode batchnorm needs two tokens: the running variance update divides by T - 1.
Status check_mode(const Config& cfg, Mode mode, const TensorView& x) {
  if (mode == Mode::training && cfg.router_norm == RouterNorm::batchnorm && x.shape[0] < 2)
    return invalid_argument("x: training-mode batchnorm needs at least 2 tokens, got T = " +
                            std::to_string(x.shape[0]));
  return Status::Ok();
}

Status forward(const Config& cfg, Mode mode, const TensorView& x, const Params& p, const ForwardOutputs& out,
               Workspace ws, void* stream) {
  OMNIMOE_RETURN_IF_ERROR(validate_forward_args(cfg, x, p, out, ws));
  OMNIMOE_RETURN_IF_ERROR(check_mode(cfg, mode, x));
  if (x.device == Device::cpu) return cpu::forward(cfg, mode, x, p, out, ws);
  return cuda::forward(cfg, mode, x, p, out, ws, stream);
}

Status forward_routed(const Config& cfg, const TensorView& x, const Params& p, const TensorView& expert_ids,
                      const TensorView& gates, const TensorView& y, Workspace ws, void* stream) {
  OMNIMOE_RETURN_IF_ERROR(validate_routed_args(cfg, x, p, expert_ids, gates, y, ws));
  if (x.device == Device::cpu) return cpu::forward_routed(cfg, x, p, expert_ids, gates, y, ws);
  return cuda::forward_routed(cfg, x, p, expert_ids, gates, y, ws, stream);
}

Status backward(const Config& cfg, Mode mode, const TensorView& x, const Params& p, const TensorView& expert_ids,
                const TensorView& grad_y, const Gradients& g, Workspace ws, void* stream) {
  OMNIMOE_RETURN_IF_ERROR(validate_backward_args(cfg, x, p, expert_ids, grad_y, g, ws));
  OMNIMOE_RETURN_IF_ERROR(check_mode(cfg, mode, x));
  if (x.device == Device::cpu) return cpu::backward(cfg, mode, x, p, expert_ids, grad_y, g, ws);
  return cuda::backward(cfg, mode, x, p, expert_ids, grad_y, g, ws, stream);
}

std::int64_t sparse_gradient_capacity(const Config& cfg, std::int64_t tokens) {
  return std::min(tokens * cfg.top_k, cfg.num_experts());
}

Status backward_sparse(const Config& cfg, Mode mode, const TensorView& x, const Params& p,
                       const TensorView& expert_ids, const TensorView& grad_y, const Gradients& g,
                       const SparseExpertGradients& sparse, Workspace ws, void* stream) {
  OMNIMOE_RETURN_IF_ERROR(validate_backward_args(cfg, x, p, expert_ids, grad_y, g, ws, &sparse));
  OMNIMOE_RETURN_IF_ERROR(check_mode(cfg, mode, x));
  if (x.device == Device::cpu) return cpu::backward(cfg, mode, x, p, expert_ids, grad_y, g, ws, &sparse);
  return cuda::backward(cfg, mode, x, p, expert_ids, grad_y, g, ws, stream, &sparse);
}

Layer::Layer(const Config& cfg) : cfg_(cfg) { throw_if_error(validate(cfg)); }

std::size_t Layer::forward_workspace_size(std::int64_t tokens, DType dtype, Device device) const {
  std::size_t bytes = 0;
  throw_if_error(omnimoe::forward_workspace_size(cfg_, tokens, dtype, device, &bytes));
  return bytes;
}
std::size_t Layer::forward_workspace_size(std::int64_t tokens, DType dtype, Device device, DType ids) const {
  std::size_t bytes = 0;
  throw_if_error(omnimoe::forward_workspace_size(cfg_, tokens, dtype, device, ids, &bytes));
  return bytes;
}
std::size_t Layer::backward_workspace_size(std::int64_t tokens, DType dtype, Device device) const {
  std::size_t bytes = 0;
  throw_if_error(omnimoe::backward_workspace_size(cfg_, tokens, dtype, device, &bytes));
  return bytes;
}
void Layer::forward(Mode mode, const TensorView& x, const Params& p, const ForwardOutputs& out, Workspace ws,
                    void* stream) const {
  throw_if_error(omnimoe::forward(cfg_, mode, x, p, out, ws, stream));
}
void Layer::backward(Mode mode, const TensorView& x, const Params& p, const TensorView& expert_ids,
                     const TensorView& grad_y, const Gradients& g, Workspace ws, void* stream) const {
  throw_if_error(omnimoe::backward(cfg_, mode, x, p, expert_ids, grad_y, g, ws, stream));
}

}  // namespace omnimoe
