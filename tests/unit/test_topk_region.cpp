// The warp top-K's candidate staircase (src/cuda/topk_region.hpp), on the host: the table
// the kernel decodes holds exactly the cells with (i + 1)(j + 1) <= K, once each, and the K
// best cells of sorted axes without ties always lie among them.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <set>
#include <utility>
#include <vector>

#include "cuda/topk_region.hpp"

namespace omnimoe::cuda {
namespace {

// Slot s of the table as the kernel reads it: lane s % 32, low or high half.
unsigned slot_cell(const TopkRegion& r, int s) { return s < 32 ? r.slot[s] & 0xffffu : r.slot[s - 32] >> 16; }

TEST(TopkRegion, CellsAreTheStaircase) {
  for (int K = 1; K <= kRegionMaxK; ++K)
    for (int rk = 1; rk <= K; ++rk)
      for (int ck = 1; ck <= K; ++ck) {
        const TopkRegion r = topk_region(K, rk, ck);
        std::vector<std::pair<int, int>> want;
        for (int i = 0; i < rk; ++i)
          for (int j = 0; j < ck; ++j)
            if ((i + 1) * (j + 1) <= K) want.emplace_back(i, j);
        std::vector<std::pair<int, int>> got;
        for (int s = 0; s < 64; ++s) {
          const unsigned c = slot_cell(r, s);
          if (c == 0xffffu) continue;
          ASSERT_EQ(got.size(), static_cast<std::size_t>(s)) << "cells fill the first slots";
          got.emplace_back(static_cast<int>(c & 0xffu), static_cast<int>(c >> 8));
        }
        std::sort(got.begin(), got.end());
        ASSERT_EQ(got, want) << "K " << K << ", rk " << rk << ", ck " << ck;
        for (int i = 0; i < 32; ++i)
          ASSERT_EQ(r.width[i], i < rk ? std::min(ck, K / (i + 1)) : 0) << "row " << i;
        // A grid of at least K cells (the router's rk * ck) has at least K in the region.
        if (rk * ck >= K) ASSERT_GE(r.cells, K);
        ASSERT_EQ(r.cells, static_cast<int>(want.size()) >= K ? static_cast<int>(want.size()) : 0);
        ASSERT_LE(want.size(), 64u);
      }
  for (int K = kRegionMaxK + 1; K <= 32; ++K) EXPECT_EQ(topk_region(K, K, K).cells, 0) << "K " << K;
}

TEST(TopkRegion, HoldsTheKBestCellsOfSortedAxes) {
  std::mt19937_64 rng(11);
  std::normal_distribution<double> z;
  for (int trial = 0; trial < 3000; ++trial) {
    const int K = 1 + static_cast<int>(rng() % kRegionMaxK);
    const int rk = 1 + static_cast<int>(rng() % K), ck = 1 + static_cast<int>(rng() % K);
    if (rk * ck < K) continue;
    std::vector<double> a(rk), b(ck);  // distinct reals: no ties among the sums
    for (double& v : a) v = z(rng);
    for (double& v : b) v = z(rng);
    std::sort(a.rbegin(), a.rend());
    std::sort(b.rbegin(), b.rend());
    std::vector<std::pair<double, std::pair<int, int>>> cells;
    for (int i = 0; i < rk; ++i)
      for (int j = 0; j < ck; ++j) cells.push_back({-(a[i] + b[j]), {i, j}});
    std::sort(cells.begin(), cells.end());
    const TopkRegion r = topk_region(K, rk, ck);
    std::set<std::pair<int, int>> region;
    for (int s = 0; s < r.cells; ++s) {
      const unsigned c = slot_cell(r, s);
      region.insert({static_cast<int>(c & 0xffu), static_cast<int>(c >> 8)});
    }
    for (int k = 0; k < K; ++k)
      ASSERT_TRUE(region.count(cells[k].second)) << "K " << K << ": the " << k << "-th best cell ("
                                                  << cells[k].second.first << ", " << cells[k].second.second
                                                  << ") is outside the region";
  }
}

}  // namespace
}  // namespace omnimoe::cuda
