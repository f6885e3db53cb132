// CPU schedule stage: tasks grouped by expert (the CUDA backend does the same with a CUB
// radix sort). Stable counting sort, so tasks of one expert stay in token order and every
// reduction over them is deterministic.
#include <algorithm>

#include "cpu/cpu.hpp"

namespace omnimoe::cpu {

void schedule_by_expert(i64 num_experts, i64 num_tasks, const i32* ids, Schedule s) {
  std::fill(s.offsets, s.offsets + num_experts + 1, i64{0});
  for (i64 i = 0; i < num_tasks; ++i) ++s.offsets[ids[i] + 1];
  for (i64 e = 0; e < num_experts; ++e) s.offsets[e + 1] += s.offsets[e];
  // Place tasks using offsets as cursors, then shift the cursors back.
  for (i64 i = 0; i < num_tasks; ++i) s.order[s.offsets[ids[i]]++] = i;
  for (i64 e = num_experts; e > 0; --e) s.offsets[e] = s.offsets[e - 1];
  s.offsets[0] = 0;
}

}  // namespace omnimoe::cpu
