// Error reporting. Library entry points below the outermost layer return a Status;
// only the omnimoe::Layer methods (and the CLI) turn a failed Status into an exception.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

namespace omnimoe {

enum class StatusCode {
  ok = 0,
  invalid_argument,     // a shape, dtype, device, index or config value is wrong
  workspace_too_small,  // the caller's workspace is smaller than the size query returned
  unsupported,          // valid request this build or backend cannot serve (e.g. no CUDA)
  cuda_error,           // a CUDA runtime / cuBLAS / CUB call failed
  io_error,             // file could not be read or written, or is malformed
  internal,             // a bug: an invariant of the library itself did not hold
};

const char* status_code_name(StatusCode code);

// A Status is cheap when ok (no allocation); the message names the offending argument.
class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(StatusCode code, std::string message) : code_(code), message_(std::move(message)) {}
  static Status Ok() { return {}; }

  bool ok() const { return code_ == StatusCode::ok; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

 private:
  StatusCode code_ = StatusCode::ok;
  std::string message_;
};

inline Status invalid_argument(std::string msg) { return {StatusCode::invalid_argument, std::move(msg)}; }

// Thrown by the outermost layer (omnimoe::Layer, the CLI) for a failed Status.
class Error : public std::runtime_error {
 public:
  explicit Error(const Status& s) : std::runtime_error(s.message()), code_(s.code()) {}
  StatusCode code() const { return code_; }

 private:
  StatusCode code_;
};

inline void throw_if_error(const Status& s) {
  if (!s.ok()) throw Error(s);
}

}  // namespace omnimoe

// Propagate a failed Status to the caller.
#define OMNIMOE_RETURN_IF_ERROR(expr)          \
  do {                                         \
    ::omnimoe::Status omnimoe_status_ = (expr); \
    if (!omnimoe_status_.ok()) return omnimoe_status_; \
  } while (0)
