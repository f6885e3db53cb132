// Layer configuration: the letters of DESIGN.md section 1 (H, I, Nr, Nc, K), the three
// switches of the math (router norm, gate, activation) and the execution schedule.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "omnimoe/status.hpp"

namespace omnimoe {

enum class RouterNorm : std::uint8_t { batchnorm, none };
enum class GateKind : std::uint8_t { exp, softmax };
enum class Activation : std::uint8_t { silu, gelu, relu };
// How the CUDA backend runs the experts stage (DESIGN.md section 2). expert_centric: tasks
// sorted by expert group, tensor-core tile products (an expert row is read once per token
// chunk, not once per token that chose it); token_centric: one warp per token gathers its K
// expert rows (the paper's ablation "without expert-centric scheduling"); automatic: chosen
// from (T, K, N, H, dtype).
enum class Schedule : std::uint8_t { automatic, expert_centric, token_centric };
// Training: batchnorm uses the batch statistics and updates the running ones.
// Inference: batchnorm uses the running statistics.
enum class Mode : std::uint8_t { inference, training };

// Batchnorm constants fixed by the specification.
inline constexpr double kBatchnormEps = 1e-5;
inline constexpr double kBatchnormMomentum = 0.1;

struct Config {
  std::int64_t hidden = 0;        // H: width of x and y, and of every expert vector
  std::int64_t intermediate = 0;  // I: shared SwiGLU width; 0 turns the shared branch off
  std::int64_t grid_rows = 0;     // Nr: router grid rows; expert e = i * Nc + j
  std::int64_t grid_cols = 0;     // Nc: router grid columns
  std::int64_t top_k = 0;         // K: experts per token, 1 <= K <= Nr * Nc
  RouterNorm router_norm = RouterNorm::batchnorm;  // normalisation of the router logits
  GateKind gate = GateKind::exp;                   // exp(S) or softmax over the K scores
  Activation activation = Activation::silu;        // expert activation
  // Experts path of the CUDA forward and backward (and hence of their workspace sizes):
  // expert-centric tile products or token-centric per-token gathers; automatic picks from
  // (T, K, N, H, dtype), for each pass apart (the backward keeps the gather up to larger K,
  // so a step may run a dense forward and a gathering backward). The CPU reference computes the same math one way and ignores it.
  // Both schedules compute the same function, but they sum in different orders, so their
  // results agree within rounding, not bitwise.
  Schedule schedule = Schedule::automatic;

  std::int64_t num_experts() const { return grid_rows * grid_cols; }  // N
  bool has_shared_mlp() const { return intermediate > 0; }
};

// Checks every field; the message names the field ("config.top_k = 9 exceeds N = 8").
Status validate(const Config& c);

const char* name(RouterNorm v);
const char* name(GateKind v);
const char* name(Activation v);
const char* name(Mode v);
const char* name(Schedule v);  // "auto", "expert", "token"
std::optional<RouterNorm> parse_router_norm(std::string_view s);
std::optional<GateKind> parse_gate(std::string_view s);
std::optional<Activation> parse_activation(std::string_view s);
std::optional<Schedule> parse_schedule(std::string_view s);  // the spellings of name(Schedule)

}  // namespace omnimoe
