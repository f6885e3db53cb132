// libFuzzer target for the safetensors parser. ASan/UBSan catch any read outside the input
// or undefined arithmetic; on top of that, whatever parses must serialise and parse back to
// the same content (abort otherwise, which the fuzzer reports as a crash).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "io/safetensors.hpp"

namespace {

void fail(const char* what, const omnimoe::Status& s) {
  std::fprintf(stderr, "fuzz_safetensors: %s: %s\n", what, s.message().c_str());
  std::abort();
}

// Views of rank <= 2 must describe exactly the tensor's bytes.
void check_views(omnimoe::io::StFile& file) {
  for (auto& t : file.tensors) {
    if (t.shape.size() > omnimoe::TensorView::kMaxRank) continue;
    if (t.view().bytes() != t.data.size()) fail("view size differs from data size", omnimoe::Status::Ok());
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  omnimoe::io::StFile file;
  const omnimoe::Status parsed = omnimoe::io::parse_safetensors(data, size, &file);
  if (!parsed.ok()) {
    if (parsed.message().empty()) fail("error without a message", parsed);
    return 0;
  }
  check_views(file);
  std::vector<std::uint8_t> bytes;
  const omnimoe::Status written = omnimoe::io::serialize_safetensors(file, &bytes);
  if (!written.ok()) fail("a parsed file does not serialise", written);
  omnimoe::io::StFile again;
  const omnimoe::Status reparsed = omnimoe::io::parse_safetensors(bytes.data(), bytes.size(), &again);
  if (!reparsed.ok()) fail("a serialised file does not parse", reparsed);
  if (!(again == file)) fail("round trip changed the content", reparsed);
  return 0;
}
