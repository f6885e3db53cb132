#include "omnimoe/config.hpp"

#include <string>

namespace omnimoe {

const char* status_code_name(StatusCode code) {
  switch (code) {
    case StatusCode::ok: return "ok";
    case StatusCode::invalid_argument: return "invalid argument";
    case StatusCode::workspace_too_small: return "workspace too small";
    case StatusCode::unsupported: return "unsupported";
    case StatusCode::cuda_error: return "CUDA error";
    case StatusCode::io_error: return "I/O error";
    case StatusCode::internal: return "internal error";
  }
  return "?";
}

namespace {
// Largest extent accepted: keeps every product of two extents inside int64 and every
// per-token index inside int32 on the device.
constexpr std::int64_t kMaxExtent = std::int64_t{1} << 31;
}  // namespace

Status validate(const Config& c) {
  auto bad = [](const char* field, std::int64_t v, const std::string& why) {
    return invalid_argument("config." + std::string(field) + " = " + std::to_string(v) + ": " + why);
  };
  if (c.hidden < 1 || c.hidden >= kMaxExtent) return bad("hidden", c.hidden, "must be in [1, 2^31)");
  if (c.intermediate < 0 || c.intermediate >= kMaxExtent)
    return bad("intermediate", c.intermediate, "must be in [0, 2^31) (0 turns the shared MLP off)");
  if (c.grid_rows < 1 || c.grid_rows >= kMaxExtent) return bad("grid_rows", c.grid_rows, "must be in [1, 2^31)");
  if (c.grid_cols < 1 || c.grid_cols >= kMaxExtent) return bad("grid_cols", c.grid_cols, "must be in [1, 2^31)");
  if (c.num_experts() >= kMaxExtent)
    return bad("grid_rows", c.grid_rows,
               "grid_rows * grid_cols = " + std::to_string(c.num_experts()) + " must be below 2^31");
  if (c.top_k < 1 || c.top_k > c.num_experts())
    return bad("top_k", c.top_k, "must be in [1, N = " + std::to_string(c.num_experts()) + "]");
  if (c.router_norm != RouterNorm::batchnorm && c.router_norm != RouterNorm::none)
    return invalid_argument("config.router_norm: unknown value");
  if (c.gate != GateKind::exp && c.gate != GateKind::softmax) return invalid_argument("config.gate: unknown value");
  if (c.activation != Activation::silu && c.activation != Activation::gelu && c.activation != Activation::relu)
    return invalid_argument("config.activation: unknown value");
  if (c.schedule != Schedule::automatic && c.schedule != Schedule::expert_centric &&
      c.schedule != Schedule::token_centric)
    return invalid_argument("config.schedule: unknown value");
  return Status::Ok();
}

const char* name(RouterNorm v) { return v == RouterNorm::batchnorm ? "batchnorm" : "none"; }
const char* name(GateKind v) { return v == GateKind::exp ? "exp" : "softmax"; }
const char* name(Activation v) {
  switch (v) {
    case Activation::silu: return "silu";
    case Activation::gelu: return "gelu";
    case Activation::relu: return "relu";
  }
  return "?";
}
const char* name(Mode v) { return v == Mode::training ? "training" : "inference"; }
const char* name(Schedule v) {
  switch (v) {
    case Schedule::automatic: return "auto";
    case Schedule::expert_centric: return "expert";
    case Schedule::token_centric: return "token";
  }
  return "?";
}

std::optional<RouterNorm> parse_router_norm(std::string_view s) {
  if (s == "batchnorm") return RouterNorm::batchnorm;
  if (s == "none") return RouterNorm::none;
  return std::nullopt;
}
std::optional<GateKind> parse_gate(std::string_view s) {
  if (s == "exp") return GateKind::exp;
  if (s == "softmax") return GateKind::softmax;
  return std::nullopt;
}
std::optional<Activation> parse_activation(std::string_view s) {
  if (s == "silu") return Activation::silu;
  if (s == "gelu") return Activation::gelu;
  if (s == "relu") return Activation::relu;
  return std::nullopt;
}
std::optional<Schedule> parse_schedule(std::string_view s) {
  if (s == "auto") return Schedule::automatic;
  if (s == "expert") return Schedule::expert_centric;
  if (s == "token") return Schedule::token_centric;
  return std::nullopt;
}

}  // namespace omnimoe
