// The subcommands. Each returns the process exit status and throws UsageError or
// omnimoe::Error for main() to report.
#pragma once

#include "cli_args.hpp"

namespace omnimoe::tool {
int cmd_run(Args& args);
int cmd_check(Args& args);
int cmd_bench(Args& args);
}  // namespace omnimoe::tool
