// Workspace planning. Each backend writes ONE function that carves its buffers out of an
// Arena; the size query runs it on a counting arena (no base pointer) and the real call on
// the caller's memory, so the query and the use cannot disagree.
#pragma once

#include <cstddef>
#include <cstdint>

namespace omnimoe {

class Arena {
 public:
  static constexpr std::size_t kAlign = 256;  // cudaMalloc alignment; also good for AVX and TMA

  Arena() = default;  // counting arena
  Arena(void* base, std::size_t capacity) : base_(static_cast<char*>(base)), capacity_(capacity) {}

  // `count` elements of T, kAlign-aligned. Counting arena: returns nullptr.
  template <class T>
  T* take(std::size_t count) {
    std::size_t offset = (used_ + kAlign - 1) / kAlign * kAlign;
    used_ = offset + count * sizeof(T);
    if (base_ == nullptr) return nullptr;
    return reinterpret_cast<T*>(base_ + offset);
  }

  // Buffers of phases that never overlap in time can share memory: take a mark, carve one
  // phase, rewind to the mark, carve the next. used() is the high-water mark.
  std::size_t mark() const { return used_; }
  void rewind(std::size_t mark) {
    peak_ = used_ > peak_ ? used_ : peak_;
    used_ = mark;
  }

  // What follows starts at or past `mark` (the end of an alternative carved earlier in the
  // same region, when the one carved last is smaller).
  void skip_to(std::size_t mark) { used_ = mark > used_ ? mark : used_; }

  std::size_t used() const { return used_ > peak_ ? used_ : peak_; }
  bool fits() const { return base_ == nullptr || used() <= capacity_; }

 private:
  char* base_ = nullptr;
  std::size_t capacity_ = 0;
  std::size_t used_ = 0;
  std::size_t peak_ = 0;
};

}  // namespace omnimoe
