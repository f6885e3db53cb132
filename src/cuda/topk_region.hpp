// The warp top-K's candidate cells for small K (host side; route.cu's topk_warp_kernel reads
// the table). With both candidate lists sorted, a cell (i, j) has (i + 1)(j + 1) - 1 cells at
// least as good (the rows above it and the columns before it), so only cells with
// (i + 1)(j + 1) <= K can be among the K best: the region, a staircase of rows i < rk of
// width min(ck, K / (i + 1)). At most 64 cells, two a lane, which holds for K <= 19 (50 cells
// at K = 16, 60 at K = 19). Host-only C++, so the CPU tests check it (tests/unit).
#pragma once

#include <algorithm>

namespace omnimoe::cuda {

inline constexpr int kRegionMaxK = 19;

struct TopkRegion {
  unsigned slot[32];        // lane's cells: slot lane in bits 0-15, slot lane + 32 in bits 16-31,
                            // each (row | column << 8); 0xffff: no cell
  unsigned char width[32];  // row lane's width in the region (0 for rows beyond rk)
  int cells;                // cells in the region; 0: not used (the kernel's K pops instead)
};

// The region of the best rk rows and ck columns for K (rk, ck <= K).
inline TopkRegion topk_region(int K, int rk, int ck) {
  TopkRegion r{};
  for (unsigned& s : r.slot) s = 0xffffffffu;
  if (K > kRegionMaxK) return r;
  int n = 0;
  for (int i = 0; i < rk; ++i) {
    const int w = std::min(ck, K / (i + 1));
    r.width[i] = static_cast<unsigned char>(w);
    for (int j = 0; j < w; ++j, ++n) {
      if (n >= 64) return TopkRegion{};  // cannot happen for K <= 19 (at most 60 cells)
      const unsigned cell = static_cast<unsigned>(i) | static_cast<unsigned>(j) << 8;
      unsigned& s = r.slot[n % 32];
      s = n < 32 ? (s & 0xffff0000u) | cell : (s & 0x0000ffffu) | cell << 16;
    }
  }
  r.cells = n >= K ? n : 0;  // fewer than K cells only where the grid has fewer than K
  return r;
}

}  // namespace omnimoe::cuda
