// omnimoe: run the layer on a safetensors file, self-check it, or benchmark it.
#include <cstdio>
#include <exception>
#include <new>
#include <string>
#include <vector>

#include "commands.hpp"

namespace {

constexpr const char* kUsage =
    "usage: omnimoe <command> [options]\n"
    "\n"
    "commands:\n"
    "  run    run the layer on a safetensors file:\n"
    "         omnimoe run --in IN.safetensors --out OUT.safetensors [--device cpu|cuda] [--train] [--backward]\n"
    "                     [--schedule auto|expert|token]\n"
    "  check  self-check a random layer (gradients, invariants, CUDA against CPU):\n"
    "         omnimoe check [--device cpu|cuda] [--seed S] [--schedule auto|expert|token]\n"
    "  bench  layer latency for named configurations:\n"
    "         omnimoe bench [--device cpu|cuda] [--suite NAME] [--dtype f32|bf16|f16] [--reps N] [--csv FILE]\n"
    "                       [--schedule auto|expert|token]\n"
    "\n"
    "--schedule picks the CUDA experts path (expert-centric tile products or token-centric\n"
    "per-token gathers; auto: chosen from the sizes); the CPU ignores it.\n"
    "\n"
    "'omnimoe <command> --help' describes a command. Exit status: 0 success, 1 bad input or\n"
    "failed check, 2 bad command line.\n";

}  // namespace

int main(int argc, char** argv) {
  using namespace omnimoe::tool;
  std::vector<std::string> rest(argv + 1, argv + argc);
  if (rest.empty() || rest[0] == "--help" || rest[0] == "-h" || rest[0] == "help") {
    std::fputs(kUsage, rest.empty() ? stderr : stdout);
    return rest.empty() ? 2 : 0;
  }
  const std::string command = rest[0];
  Args args(std::vector<std::string>(rest.begin() + 1, rest.end()));
  try {
    if (command == "run") return cmd_run(args);
    if (command == "check") return cmd_check(args);
    if (command == "bench") return cmd_bench(args);
    throw UsageError("unknown command '" + command + "'");
  } catch (const UsageError& e) {
    std::fprintf(stderr, "omnimoe: %s\n(see 'omnimoe --help')\n", e.what());
    return 2;
  } catch (const omnimoe::Error& e) {
    std::fprintf(stderr, "omnimoe: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "omnimoe: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "omnimoe: %s\n", e.what());
    return 1;
  }
}
