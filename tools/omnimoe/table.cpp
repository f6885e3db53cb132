#include "table.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdarg>
#include <cstring>
#include <fstream>

#include "omnimoe/status.hpp"

namespace omnimoe::tool {

void Table::print(std::FILE* f) const {
  std::vector<std::size_t> width(header_.size());
  for (std::size_t c = 0; c < header_.size(); ++c) {
    width[c] = header_[c].size();
    for (const auto& r : rows_) width[c] = std::max(width[c], std::max<std::size_t>(r[c].size(), 1));
  }
  auto line = [&](const std::vector<std::string>& r) {
    for (std::size_t c = 0; c < r.size(); ++c) {
      const std::string& cell = r[c].empty() ? "-" : r[c];
      // Names left-aligned, numbers right-aligned.
      std::fprintf(f, c == 0 ? "%-*s" : "  %*s", static_cast<int>(width[c]), cell.c_str());
    }
    std::fputc('\n', f);
  };
  line(header_);
  for (const auto& r : rows_) line(r);
}

void Table::write_csv(const std::string& path) const {
  std::ofstream out(path);
  auto row = [&](const std::vector<std::string>& r) {
    for (std::size_t c = 0; c < r.size(); ++c) out << (c ? "," : "") << r[c];
    out << '\n';
  };
  row(header_);
  for (const auto& r : rows_) row(r);
  out.close();
  if (!out) throw Error({StatusCode::io_error, path + ": cannot write CSV: " + std::strerror(errno)});
}

std::string strfmt(const char* format, ...) {
  char buf[256];
  va_list ap;
  va_start(ap, format);
  std::vsnprintf(buf, sizeof buf, format, ap);
  va_end(ap);
  return buf;
}

}  // namespace omnimoe::tool
