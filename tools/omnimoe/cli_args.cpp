#include "cli_args.hpp"

#include <algorithm>
#include <charconv>

#include "core/backend.hpp"
#include "omnimoe/device.hpp"

namespace omnimoe::tool {

void fail(const std::string& message) { throw Error(invalid_argument(message)); }

bool Args::flag(std::string_view name) {
  auto it = std::find(args_.begin(), args_.end(), name);
  if (it == args_.end()) return false;
  args_.erase(it);
  return true;
}

std::optional<std::string> Args::value(std::string_view name) {
  for (auto it = args_.begin(); it != args_.end(); ++it) {
    if (*it == name) {
      if (it + 1 == args_.end()) throw UsageError(std::string(name) + " needs a value");
      std::string v = *(it + 1);
      args_.erase(it, it + 2);
      return v;
    }
    if (it->size() > name.size() && it->starts_with(name) && (*it)[name.size()] == '=') {
      std::string v = it->substr(name.size() + 1);
      args_.erase(it);
      return v;
    }
  }
  return std::nullopt;
}

std::string Args::required(std::string_view name) {
  auto v = value(name);
  if (!v) throw UsageError(std::string(name) + " is required");
  return *v;
}

void Args::finish() const {
  if (!args_.empty()) throw UsageError("unknown argument '" + args_.front() + "'");
}

std::optional<std::int64_t> parse_decimal(std::string_view s) {
  if (s.empty() || !std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; }))
    return std::nullopt;
  std::int64_t v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size()) return std::nullopt;  // overflow
  return v;
}

std::int64_t positive_option(std::string_view option, const std::string& text) {
  auto v = parse_decimal(text);
  if (!v || *v < 1) throw UsageError(std::string(option) + " '" + text + "': expected a positive integer");
  return *v;
}

Device device_option(const std::string& text) {
  if (text == "cpu") return Device::cpu;
  if (text == "cuda") return Device::cuda;
  throw UsageError("--device '" + text + "': expected cpu or cuda");
}

DType float_dtype_option(const std::string& text) {
  for (DType d : {DType::f64, DType::f32, DType::bf16, DType::f16})
    if (text == dtype_name(d)) return d;
  throw UsageError("--dtype '" + text + "': expected f32, bf16, f16 or f64");
}

Schedule schedule_option(const std::optional<std::string>& text) {
  if (!text) return Schedule::automatic;
  if (auto s = parse_schedule(*text)) return *s;
  throw UsageError("--schedule '" + *text + "': expected auto, expert or token");
}

Device best_device() { return cuda_available() ? Device::cuda : Device::cpu; }

std::string cuda_unavailable_reason() {
  if (!cuda::built()) return "this build of omnimoe has no CUDA backend (no CUDA toolkit was found)";
  if (!cuda_available()) return "no CUDA device is present";
  return "";
}

void require_device(Device d) {
  if (d == Device::cuda && !cuda_available()) fail("--device cuda: " + cuda_unavailable_reason());
}

}  // namespace omnimoe::tool
