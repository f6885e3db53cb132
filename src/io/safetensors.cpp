#include "io/safetensors.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <stdexcept>
#include <string_view>
#include <utility>

#include <nlohmann/json.hpp>

namespace omnimoe::io {
namespace {

// nlohmann::json keeps object keys sorted; the header order of tensors is recorded while
// parsing instead (ordered_json would keep it, but inserts each key by a linear search,
// which a header with many keys turns into quadratic time).
using Json = nlohmann::json;

// The reference (Rust) implementation's cap: a larger header is an attack, not a model.
constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;
constexpr const char* kMetadataKey = "__metadata__";

struct DTypeName {
  DType dtype;
  const char* name;
};
constexpr DTypeName kDTypeNames[] = {
    {DType::f64, "F64"}, {DType::f32, "F32"}, {DType::f16, "F16"},
    {DType::bf16, "BF16"}, {DType::i32, "I32"}, {DType::i64, "I64"},
};

// The byte range [begin, end) of the data section owned by tensors[index].
struct Range {
  std::uint64_t begin = 0;
  std::uint64_t end = 0;
  std::size_t index = 0;
};

Status io_err(std::string msg) { return {StatusCode::io_error, "safetensors: " + std::move(msg)}; }

// Names come from untrusted input: keep messages bounded.
std::string quote(const std::string& s) {
  constexpr std::size_t kMax = 64;
  return "'" + (s.size() <= kMax ? s : s.substr(0, kMax) + "...") + "'";
}

Status tensor_err(const std::string& name, const std::string& problem) {
  return io_err("tensor " + quote(name) + ": " + problem);
}

bool dtype_from_name(const std::string& s, DType* out) {
  for (const auto& d : kDTypeNames) {
    if (s == d.name) {
      *out = d.dtype;
      return true;
    }
  }
  return false;
}

const char* dtype_file_name(DType t) {
  for (const auto& d : kDTypeNames) {
    if (d.dtype == t) return d.name;
  }
  return "?";
}

std::uint64_t load_u64_le(const std::uint8_t* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

void append_u64_le(std::uint64_t v, std::vector<std::uint8_t>* out) {
  for (int i = 0; i < 8; ++i) out->push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}

// Byte size of a tensor, checked: extents >= 0, and neither the element count (int64)
// nor the byte count (uint64) overflows. The product is taken left to right, so a shape
// like [2^40, 2^40, 0] is rejected even though it has no elements.
Status checked_bytes(const std::string& name, const std::vector<std::int64_t>& shape, DType dtype,
                     std::uint64_t* bytes) {
  std::int64_t numel = 1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) return tensor_err(name, "shape[" + std::to_string(i) + "] is negative");
    if (__builtin_mul_overflow(numel, shape[i], &numel)) {
      return tensor_err(name, "shape element count overflows int64");
    }
  }
  if (__builtin_mul_overflow(static_cast<std::uint64_t>(numel), dtype_size(dtype), bytes)) {
    return tensor_err(name, "shape byte size overflows uint64");
  }
  return Status::Ok();
}

// ---- header JSON --------------------------------------------------------------------

// nlohmann's own DOM builder (from its detail namespace; stable since 3.2), extended to see
// every key: it stops at a repeated key (nlohmann would silently keep one value) and
// records the root object's keys in file order. The documented alternative, a parser
// callback, makes nlohmann rescan the parent after every nested object: quadratic in the
// number of tensors.
class HeaderSax : public nlohmann::detail::json_sax_dom_parser<Json> {
  using Base = nlohmann::detail::json_sax_dom_parser<Json>;

 public:
  explicit HeaderSax(Json* root) : Base(*root, /*allow_exceptions_=*/false) {}

  // sax_parse() is a template over the handler, so these hide (not override) Base's.
  bool start_object(std::size_t n) {
    open_objects_.emplace_back();
    ++depth_;
    return Base::start_object(n);
  }
  bool end_object() {
    open_objects_.pop_back();
    --depth_;
    return Base::end_object();
  }
  bool start_array(std::size_t n) {
    ++depth_;
    return Base::start_array(n);
  }
  bool end_array() {
    --depth_;
    return Base::end_array();
  }
  bool key(std::string& k) {
    if (!open_objects_.back().insert(k).second) {
      error_ = io_err(depth_ == 1 ? "duplicate tensor name " + quote(k)
                                  : "duplicate key " + quote(k) + " in a header object");
      return false;
    }
    if (depth_ == 1) root_keys_.push_back(k);
    return Base::key(k);
  }
  template <class Exception>
  bool parse_error(std::size_t /*position*/, const std::string& /*token*/, const Exception& e) {
    error_ = io_err(std::string("header is not valid JSON: ") + e.what());
    return false;
  }

  const Status& error() const { return error_; }
  std::vector<std::string>& root_keys() { return root_keys_; }

 private:
  std::vector<std::set<std::string>> open_objects_;
  int depth_ = 0;  // open objects and arrays
  std::vector<std::string> root_keys_;
  Status error_;
};

// `keys` receives the header's keys in file order.
Status parse_header_json(const std::uint8_t* text, std::size_t size, Json* out,
                         std::vector<std::string>* keys) {
  // nlohmann's lexer stops at a NUL byte as if the input ended, which would let bytes
  // after it through unparsed; valid JSON never contains one.
  if (std::memchr(text, 0, size) != nullptr) return io_err("header contains a NUL byte");
  HeaderSax sax(out);
  if (!Json::sax_parse(text, text + size, &sax)) {
    return sax.error().ok() ? io_err("header is not valid JSON") : sax.error();
  }
  if (!out->is_object()) return io_err("header is not a JSON object");
  *keys = std::move(sax.root_keys());
  return Status::Ok();
}

// ---- one tensor entry ---------------------------------------------------------------

enum class IntKind { ok, negative, not_integer };

// nlohmann stores non-negative integers as unsigned, but "-0" as signed, and fractions,
// exponents and integers beyond 64 bits as floating point.
IntKind get_non_negative(const Json& j, std::uint64_t* v) {
  if (j.is_number_unsigned()) {
    *v = j.get<std::uint64_t>();
    return IntKind::ok;
  }
  if (!j.is_number_integer()) return IntKind::not_integer;
  const auto s = j.get<std::int64_t>();
  if (s < 0) return IntKind::negative;
  *v = static_cast<std::uint64_t>(s);
  return IntKind::ok;
}

Status check_fields(const std::string& name, const Json& entry) {
  static const char* const kFields[] = {"dtype", "shape", "data_offsets"};
  if (!entry.is_object()) return tensor_err(name, "entry is not a JSON object");
  for (const auto& item : entry.items()) {
    if (std::find(std::begin(kFields), std::end(kFields), item.key()) == std::end(kFields)) {
      return tensor_err(name, "unknown field " + quote(item.key()));
    }
  }
  for (const char* field : kFields) {
    if (!entry.contains(field)) return tensor_err(name, std::string("missing field '") + field + "'");
  }
  return Status::Ok();
}

Status parse_dtype(const std::string& name, const Json& j, DType* dtype) {
  if (!j.is_string()) return tensor_err(name, "dtype is not a string");
  if (!dtype_from_name(j.get<std::string>(), dtype)) {
    return tensor_err(name, "unknown dtype " + quote(j.get<std::string>()) +
                                " (expected F64, F32, F16, BF16, I32 or I64)");
  }
  return Status::Ok();
}

Status parse_shape(const std::string& name, const Json& j, std::vector<std::int64_t>* shape) {
  if (!j.is_array()) return tensor_err(name, "shape is not an array");
  for (std::size_t i = 0; i < j.size(); ++i) {
    const std::string field = "shape[" + std::to_string(i) + "]";
    std::uint64_t v = 0;
    switch (get_non_negative(j[i], &v)) {
      case IntKind::negative: return tensor_err(name, field + " is negative");
      case IntKind::not_integer: return tensor_err(name, field + " is not a 64-bit integer");
      case IntKind::ok: break;
    }
    if (v > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
      return tensor_err(name, field + " is too large for int64");
    }
    shape->push_back(static_cast<std::int64_t>(v));
  }
  return Status::Ok();
}

Status parse_offsets(const std::string& name, const Json& j, std::uint64_t data_size,
                     std::uint64_t bytes, Range* range) {
  std::uint64_t v[2] = {0, 0};
  if (!j.is_array() || j.size() != 2 || get_non_negative(j[0], &v[0]) != IntKind::ok ||
      get_non_negative(j[1], &v[1]) != IntKind::ok) {
    return tensor_err(name, "data_offsets is not [begin, end] with non-negative integers");
  }
  const std::string where = "data_offsets [" + std::to_string(v[0]) + ", " + std::to_string(v[1]) + "]";
  if (v[0] > v[1]) return tensor_err(name, where + ": begin > end");
  if (v[1] > data_size) {
    return tensor_err(name, where + ": end is beyond the data section (" +
                                std::to_string(data_size) + " bytes)");
  }
  if (v[1] - v[0] != bytes) {
    return tensor_err(name, where + ": holds " + std::to_string(v[1] - v[0]) +
                                " bytes but shape and dtype need " + std::to_string(bytes));
  }
  range->begin = v[0];
  range->end = v[1];
  return Status::Ok();
}

// Fills everything but the data, which is copied once all ranges are known to be disjoint
// (so a hostile header cannot make the parser copy the same bytes many times).
Status parse_tensor(const std::string& name, const Json& entry, std::uint64_t data_size,
                    StTensor* t, Range* range) {
  OMNIMOE_RETURN_IF_ERROR(check_fields(name, entry));
  t->name = name;
  OMNIMOE_RETURN_IF_ERROR(parse_dtype(name, entry["dtype"], &t->dtype));
  OMNIMOE_RETURN_IF_ERROR(parse_shape(name, entry["shape"], &t->shape));
  std::uint64_t bytes = 0;
  OMNIMOE_RETURN_IF_ERROR(checked_bytes(name, t->shape, t->dtype, &bytes));
  return parse_offsets(name, entry["data_offsets"], data_size, bytes, range);
}

Status parse_metadata(const Json& j, std::map<std::string, std::string>* out) {
  if (!j.is_object()) return io_err("__metadata__ is not a JSON object");
  for (const auto& item : j.items()) {
    if (!item.value().is_string()) {
      return io_err("__metadata__ value of key " + quote(item.key()) + " is not a string");
    }
    (*out)[item.key()] = item.value().get<std::string>();
  }
  return Status::Ok();
}

// Empty ranges own no bytes and are skipped; after sorting by begin, disjoint non-empty
// ranges have each end <= the next begin, so checking neighbours suffices.
Status check_disjoint(const std::vector<StTensor>& tensors, std::vector<Range> ranges) {
  std::erase_if(ranges, [](const Range& r) { return r.begin == r.end; });
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  for (std::size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i - 1].end > ranges[i].begin) {
      return io_err("tensors " + quote(tensors[ranges[i - 1].index].name) + " and " +
                    quote(tensors[ranges[i].index].name) +
                    " overlap in the data section");
    }
  }
  return Status::Ok();
}

Status parse_entries(const Json& header, const std::vector<std::string>& keys, const std::uint8_t* data,
                     std::uint64_t data_size, StFile* file) {
  std::vector<Range> ranges;
  for (const std::string& key : keys) {
    const Json& value = header.find(key).value();
    if (key == kMetadataKey) {
      OMNIMOE_RETURN_IF_ERROR(parse_metadata(value, &file->metadata));
      continue;
    }
    Range& r = ranges.emplace_back();
    r.index = file->tensors.size();
    OMNIMOE_RETURN_IF_ERROR(parse_tensor(key, value, data_size, &file->tensors.emplace_back(), &r));
  }
  OMNIMOE_RETURN_IF_ERROR(check_disjoint(file->tensors, ranges));
  for (const Range& r : ranges) {
    const auto* first = reinterpret_cast<const std::byte*>(data + r.begin);
    file->tensors[r.index].data.assign(first, first + (r.end - r.begin));
  }
  return Status::Ok();
}

// ---- writing ------------------------------------------------------------------------

// The entry's fields in the conventional order dtype, shape, data_offsets.
Status tensor_entry(const StTensor& t, std::uint64_t begin, nlohmann::ordered_json* entry) {
  std::uint64_t bytes = 0;
  OMNIMOE_RETURN_IF_ERROR(checked_bytes(t.name, t.shape, t.dtype, &bytes));
  if (t.data.size() != bytes) {
    return tensor_err(t.name, "has " + std::to_string(t.data.size()) + " data bytes but shape and dtype need " +
                                  std::to_string(bytes));
  }
  *entry = nlohmann::ordered_json::object();
  (*entry)["dtype"] = dtype_file_name(t.dtype);
  (*entry)["shape"] = t.shape;
  (*entry)["data_offsets"] = {begin, begin + bytes};
  return Status::Ok();
}

// Appends `"key":value` to the header text being built (without braces).
void append_member(const std::string& key, const std::string& value_json, std::string* text) {
  if (!text->empty()) *text += ',';
  *text += Json(key).dump() + ':' + value_json;
}

// Built member by member: one JSON object of all tensors would either sort the names
// (json) or look each one up linearly (ordered_json).
Status header_members(const StFile& file, std::string* text) {
  if (!file.metadata.empty()) append_member(kMetadataKey, Json(file.metadata).dump(), text);
  std::set<std::string_view> names;
  std::uint64_t offset = 0;
  for (const StTensor& t : file.tensors) {
    if (t.name == kMetadataKey) return io_err("a tensor may not be named '__metadata__'");
    if (!names.insert(t.name).second) return io_err("duplicate tensor name " + quote(t.name));
    nlohmann::ordered_json entry;
    OMNIMOE_RETURN_IF_ERROR(tensor_entry(t, offset, &entry));
    append_member(t.name, entry.dump(), text);
    offset += t.data.size();
  }
  return Status::Ok();
}

Status header_text(const StFile& file, std::string* text) {
  std::string members;
  try {
    OMNIMOE_RETURN_IF_ERROR(header_members(file, &members));
  } catch (const Json::exception& e) {  // dump(): invalid UTF-8 in a name or metadata string
    return io_err(std::string("cannot encode header: ") + e.what());
  }
  *text = '{' + members + '}';
  text->append((8 - text->size() % 8) % 8, ' ');
  if (text->size() > kMaxHeaderBytes) return io_err("header is larger than 100 MB");
  return Status::Ok();
}

// Returns "" on success, else why the write failed.
std::string write_file(const std::string& path, const std::vector<std::uint8_t>& bytes) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (f == nullptr) return std::strerror(errno);
  const bool written = std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
  const int write_errno = errno;
  const bool closed = std::fclose(f) == 0;
  if (!written) return std::strerror(write_errno);
  if (!closed) return std::strerror(errno);
  return "";
}

Status read_file(const std::string& path, std::vector<std::uint8_t>* bytes) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (ec) return {StatusCode::io_error, "cannot read '" + path + "': " + ec.message()};
  if (!fs::is_regular_file(st)) return {StatusCode::io_error, "cannot read '" + path + "': not a regular file"};
  const std::uintmax_t size = fs::file_size(path, ec);
  if (ec) return {StatusCode::io_error, "cannot read '" + path + "': " + ec.message()};
  std::ifstream in(path, std::ios::binary);
  if (!in) return {StatusCode::io_error, "cannot open '" + path + "': " + std::strerror(errno)};
  bytes->resize(size);
  in.read(reinterpret_cast<char*>(bytes->data()), static_cast<std::streamsize>(size));
  if (static_cast<std::uintmax_t>(in.gcount()) != size) {
    return {StatusCode::io_error, "cannot read '" + path + "': short read"};
  }
  return Status::Ok();
}

Status with_path(const std::string& path, const Status& s) {
  return s.ok() ? s : Status{s.code(), path + ": " + s.message()};
}

}  // namespace

std::int64_t StTensor::numel() const {
  std::int64_t n = 1;
  for (const std::int64_t d : shape) n *= d;
  return n;
}

TensorView StTensor::view() {
  void* p = data.data();
  switch (shape.size()) {
    case 0: return make_view(p, dtype, Device::cpu, {});
    case 1: return make_view(p, dtype, Device::cpu, {shape[0]});
    case 2: return make_view(p, dtype, Device::cpu, {shape[0], shape[1]});
    default:
      throw std::invalid_argument("StTensor::view: tensor '" + name + "' has rank " +
                                  std::to_string(shape.size()) + " > " +
                                  std::to_string(TensorView::kMaxRank));
  }
}

const StTensor* StFile::find(const std::string& name) const {
  const auto it = std::find_if(tensors.begin(), tensors.end(), [&](const StTensor& t) { return t.name == name; });
  return it == tensors.end() ? nullptr : &*it;
}

StTensor* StFile::find(const std::string& name) {
  return const_cast<StTensor*>(std::as_const(*this).find(name));
}

Status parse_safetensors(const std::uint8_t* data, std::size_t size, StFile* out) {
  if (size < 8) {
    return io_err("file is " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
  }
  const std::uint64_t n = load_u64_le(data);
  if (n > kMaxHeaderBytes) return io_err("header length " + std::to_string(n) + " exceeds the 100 MB limit");
  if (n > size - 8) {
    return io_err("header length " + std::to_string(n) + " exceeds the " + std::to_string(size - 8) +
                  " bytes after the length field");
  }
  Json header;
  std::vector<std::string> keys;
  OMNIMOE_RETURN_IF_ERROR(parse_header_json(data + 8, n, &header, &keys));
  StFile file;
  OMNIMOE_RETURN_IF_ERROR(parse_entries(header, keys, data + 8 + n, size - 8 - n, &file));
  *out = std::move(file);
  return Status::Ok();
}

Status read_safetensors(const std::string& path, StFile* out) {
  std::vector<std::uint8_t> bytes;
  OMNIMOE_RETURN_IF_ERROR(read_file(path, &bytes));
  return with_path(path, parse_safetensors(bytes.data(), bytes.size(), out));
}

Status serialize_safetensors(const StFile& file, std::vector<std::uint8_t>* out) {
  std::string text;
  OMNIMOE_RETURN_IF_ERROR(header_text(file, &text));
  out->clear();
  append_u64_le(text.size(), out);
  out->insert(out->end(), text.begin(), text.end());
  for (const StTensor& t : file.tensors) {
    const auto* first = reinterpret_cast<const std::uint8_t*>(t.data.data());
    out->insert(out->end(), first, first + t.data.size());
  }
  return Status::Ok();
}

Status write_safetensors(const std::string& path, const StFile& file) {
  std::vector<std::uint8_t> bytes;
  OMNIMOE_RETURN_IF_ERROR(with_path(path, serialize_safetensors(file, &bytes)));
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  std::string why = write_file(tmp, bytes);
  if (why.empty()) {
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    if (ec) why = ec.message();
  }
  if (why.empty()) return Status::Ok();
  std::error_code ignored;
  std::filesystem::remove(tmp, ignored);
  return {StatusCode::io_error, "cannot write '" + path + "': " + why};
}

}  // namespace omnimoe::io
