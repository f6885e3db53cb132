// Command-line parsing shared by the subcommands. A UsageError is a mistake in the command
// line (exit status 2); an omnimoe::Error is a problem with the input or the run (status 1).
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "omnimoe/config.hpp"
#include "omnimoe/status.hpp"
#include "omnimoe/tensor.hpp"

namespace omnimoe::tool {

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Input problem: throws omnimoe::Error (invalid_argument) with `message`.
[[noreturn]] void fail(const std::string& message);

// The arguments after the subcommand. Each option is taken once by name; whatever is left
// when finish() is called is an unknown option.
class Args {
 public:
  explicit Args(std::vector<std::string> args) : args_(std::move(args)) {}

  bool flag(std::string_view name);                          // "--train"
  std::optional<std::string> value(std::string_view name);   // "--in F" or "--in=F"
  std::string required(std::string_view name);               // value() or UsageError
  bool help() { return flag("--help") || flag("-h"); }
  void finish() const;                                       // UsageError on leftovers

 private:
  std::vector<std::string> args_;
};

// Plain decimal digits without sign, exponent or trailing text, that fit in 63 bits.
std::optional<std::int64_t> parse_decimal(std::string_view s);
// Option values (UsageError naming the option when wrong).
std::int64_t positive_option(std::string_view option, const std::string& text);
Device device_option(const std::string& text);
DType float_dtype_option(const std::string& text);
// --schedule auto|expert|token (Config::schedule); automatic when the option is absent.
Schedule schedule_option(const std::optional<std::string>& text);
// Default device for check and bench: cuda when this build has it and a GPU is present.
Device best_device();
// Why --device cuda cannot run here ("" when it can).
std::string cuda_unavailable_reason();
// Throws omnimoe::Error when `d` cannot run here.
void require_device(Device d);

}  // namespace omnimoe::tool
