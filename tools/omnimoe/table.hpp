// A results table printed with aligned columns and written as CSV (empty cells: unknown).
#pragma once

#include <cstdio>
#include <string>
#include <vector>

namespace omnimoe::tool {

class Table {
 public:
  explicit Table(std::vector<std::string> header) : header_(std::move(header)) {}
  void add(std::vector<std::string> row) { rows_.push_back(std::move(row)); }
  void print(std::FILE* f) const;                 // empty cells print as "-"
  void write_csv(const std::string& path) const;  // throws omnimoe::Error (io_error)

 private:
  std::vector<std::string> header_;
  std::vector<std::vector<std::string>> rows_;
};

// printf-style formatting into a std::string.
std::string strfmt(const char* format, ...) __attribute__((format(printf, 1, 2)));

}  // namespace omnimoe::tool
