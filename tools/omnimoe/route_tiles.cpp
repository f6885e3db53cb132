// route_tiles: how a router's choices fall on tiles of consecutive expert ids, at the
// paper family's sizes (H = 1024, 320 x 320 experts). The question it answers: how much of
// the dense path's score product (every token against every expert) a block-sparse product
// over tiles of experts, each with the tokens that chose one of them gathered, would skip.
//
//   route_tiles [T=1024] [K=512] [seed=1] [side=320]
//
// `side` sets the grid (side x side experts; the LM family's are 64, 256 and 1024, with
// K = 16). It also prints the tasks per expert (how skewed the router's choices are: the
// backward's expert-row sums split a segment longer than its `piece` of tasks).
//
// Random layer as the benchmark builds it (random_layer), the CPU forward in inference mode;
// per tile width: tiles per token (min, median, p90, max; and what uniform random ids would
// give), the (token, tile) pairs (the gathered rows of such a product), the share of the
// dense product's work they mean, and the tokens per tile.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <vector>

#include "layer_tensors.hpp"

using namespace omnimoe;
using namespace omnimoe::tool;

namespace {

int run(int argc, char** argv) {
  const long T = argc > 1 ? std::atol(argv[1]) : 1024, K = argc > 2 ? std::atol(argv[2]) : 512;
  const auto seed = static_cast<std::uint64_t>(argc > 3 ? std::atoll(argv[3]) : 1);
  const long side = argc > 4 ? std::atol(argv[4]) : 320;
  Config cfg;
  cfg.hidden = 1024;
  cfg.intermediate = 0;  // the shared MLP does not route
  cfg.grid_rows = cfg.grid_cols = side;
  cfg.top_k = K;
  if (T < 1 || side < 1 || side > 4096 || K < 1 || K > cfg.num_experts()) {
    std::fprintf(stderr, "route_tiles: need T >= 1, 1 <= side <= 4096 and 1 <= K <= %ld\n",
                 static_cast<long>(side >= 1 ? cfg.num_experts() : 0));
    return 2;
  }
  const LayerTensors l = random_layer(cfg, T, DType::f32, Device::cpu, seed);
  const ForwardBuffers out = forward_buffers(l, DType::i64);
  const Buffer ws = workspace(l, false);
  const Status st =
      forward(cfg, Mode::inference, l.x[0].view(), l.params(), out.outputs(), Workspace{ws.data(), ws.bytes()});
  if (!st.ok()) {
    std::fprintf(stderr, "route_tiles: %s\n", st.message().c_str());
    return 1;
  }
  const auto* ids = static_cast<const std::int64_t*>(out.expert_ids.view().data);
  const long N = cfg.num_experts();
  std::printf("T = %ld, K = %ld, N = %ld (%ld x %ld), seed %llu\n", T, K, N, side, side,
              static_cast<unsigned long long>(seed));
  {  // tasks per expert: mean over all experts, and the most any expert got
    std::vector<long> count(static_cast<std::size_t>(N), 0);
    for (long i = 0; i < T * K; ++i) ++count[static_cast<std::size_t>(ids[i])];
    long chosen = 0;
    for (long c : count) chosen += c > 0;
    std::sort(count.begin(), count.end());
    std::printf("tasks per expert: mean %.2f, p99 %ld, p99.99 %ld, max %ld; %ld of %ld experts chosen\n",
                static_cast<double>(T * K) / N, count[static_cast<std::size_t>(N * 99 / 100)],
                count[static_cast<std::size_t>(N * 9999 / 10000)], count.back(), chosen, N);
  }
  // work: the pairs times the tile width against T N, the share of the dense score product's
  // multiply-adds a gathered block-sparse product would do.
  std::printf("%6s %6s %24s %11s %9s %6s %18s\n", "tile", "tiles", "tiles/token min/med/p90/max", "random ids",
              "pairs", "work", "tokens/tile avg max");
  for (long tile : {16L, 64L, 128L, 320L, 8192L}) {
    const long tiles = (N + tile - 1) / tile;
    std::vector<long> per_token(static_cast<std::size_t>(T));
    std::vector<long> tokens_of(static_cast<std::size_t>(tiles), 0);
    std::vector<long> seen(static_cast<std::size_t>(tiles), -1);  // last token that touched the tile
    for (long t = 0; t < T; ++t) {
      long n = 0;
      for (long k = 0; k < K; ++k) {
        const long g = ids[t * K + k] / tile;
        if (seen[g] != t) seen[g] = t, ++n, ++tokens_of[g];
      }
      per_token[t] = n;
    }
    std::sort(per_token.begin(), per_token.end());
    double pairs = 0;
    long most = 0;
    for (long c : tokens_of) pairs += static_cast<double>(c), most = std::max(most, c);
    // Uniform random distinct ids: a tile of width w is missed with probability ~(1 - w/N)^K.
    const double random = static_cast<double>(tiles) * (1 - std::pow(1 - static_cast<double>(tile) / N, K));
    char spread[64];
    std::snprintf(spread, sizeof spread, "%ld/%ld/%ld/%ld", per_token[0], per_token[T / 2], per_token[T * 9 / 10],
                  per_token[T - 1]);
    std::printf("%6ld %6ld %27s %11.0f %9.0f %6.3f %12.1f %5ld\n", tile, tiles, spread, random, pairs,
                pairs / (static_cast<double>(T) * tiles), pairs / static_cast<double>(tiles), most);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {  // random_layer and the tensors throw on failure
    std::fprintf(stderr, "route_tiles: %s\n", e.what());
    return 1;
  }
}
