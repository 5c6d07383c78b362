// Host emulation of the CUDA features the lpa_kernels kernels use, so their code can be compiled by
// g++ and checked on a machine without a GPU (tests/cuda/test_emulated_kernels.py). Force-included
// before each source; `kernel<<<grid, block, smem, stream>>>(args)` is rewritten by build.py into
// `lpa_emu::launch(grid, block, [&] { kernel(args); })`.
//
// Every block runs after the previous one; its threads are real std::threads, so __syncthreads is a
// real barrier and __shared__ (made `static`) is one buffer shared by the block's threads. wmma is
// emulated in mma.h next to this file. The blocks run in index order, or in the order the environment
// variable LPA_EMU_BLOCK_ORDER names at the launch: "reversed", or "shuffled:<seed>" (tests/program_order.py).
// A launch whose grid or block exceeds CUDA's limits throws, as the GPU would refuse it; with
// LPA_EMU_LAUNCH=configure a launch is only checked, not run (for grids too large to emulate).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <math.h>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define __launch_bounds__(...)
#define __maxnreg__(...)
#define __shared__ static
#define cudaGetLastError() cudaSuccess

namespace lpa_emu {

inline thread_local uint3 thread_index, block_index;
inline dim3 block_dim, grid_dim;
inline std::unique_ptr<std::barrier<>> block_barrier;
inline std::atomic<int> vote{0};

// The linear block indices (x fastest) in the order this launch runs them (see the header comment).
inline std::vector<unsigned> block_order(unsigned count) {
  std::vector<unsigned> order(count);
  std::iota(order.begin(), order.end(), 0u);
  const char* chosen = std::getenv("LPA_EMU_BLOCK_ORDER");
  if (chosen == nullptr || *chosen == '\0') return order;
  if (std::strcmp(chosen, "reversed") == 0) {
    std::reverse(order.begin(), order.end());
  } else if (std::strncmp(chosen, "shuffled:", 9) == 0) {
    std::mt19937 generator(static_cast<unsigned>(std::stoul(chosen + 9)) + count);
    std::shuffle(order.begin(), order.end(), generator);
  } else {
    throw std::invalid_argument(std::string("LPA_EMU_BLOCK_ORDER must be reversed or shuffled:<seed>, got ") + chosen);
  }
  return order;
}

// CUDA's launch limits (compute capability 7.0 and later): grid x up to 2^31 - 1 blocks, y and z up to
// 65535; up to 1024 threads per block, at most 64 along z.
inline void check_configuration(dim3 grid, dim3 block) {
  const bool grid_ok = grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 2147483647u && grid.y <= 65535u &&
                       grid.z <= 65535u;
  const bool block_ok = block.x >= 1 && block.y >= 1 && block.z >= 1 && block.z <= 64u &&
                        uint64_t(block.x) * block.y * block.z <= 1024u;
  if (!grid_ok || !block_ok) {
    throw std::invalid_argument("emulated launch: grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) +
                                ", " + std::to_string(grid.z) + ") or block (" + std::to_string(block.x) + ", " +
                                std::to_string(block.y) + ", " + std::to_string(block.z) +
                                ") exceeds CUDA's launch limits");
  }
}

inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  check_configuration(grid, block);
  const char* mode = std::getenv("LPA_EMU_LAUNCH");
  if (mode != nullptr && std::strcmp(mode, "configure") == 0) return;
  block_dim = block;
  grid_dim = grid;
  const unsigned threads = block.x * block.y * block.z;
  const std::vector<unsigned> order = block_order(grid.x * grid.y * grid.z);
  block_barrier = std::make_unique<std::barrier<>>(threads);
  // One std::thread per CUDA thread, walking the blocks in `order`; the barrier after each block keeps
  // a block's threads from starting the next block while others still use the shared buffers.
  std::vector<std::thread> pool;
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      thread_index = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      for (const unsigned linear : order) {
        block_index = {linear % grid.x, linear / grid.x % grid.y, linear / (grid.x * grid.y)};
        body();
        block_barrier->arrive_and_wait();
      }
    });
  }
  for (auto& th : pool) th.join();
}

inline void syncthreads() { block_barrier->arrive_and_wait(); }

inline int syncthreads_or(int predicate) {
  syncthreads();
  if (predicate) vote.fetch_or(1);
  syncthreads();
  const int result = vote.load();
  syncthreads();
  if (thread_index.x == 0 && thread_index.y == 0 && thread_index.z == 0) vote.store(0);
  syncthreads();
  return result;
}

}  // namespace lpa_emu

#define threadIdx (::lpa_emu::thread_index)
#define blockIdx (::lpa_emu::block_index)
#define blockDim (::lpa_emu::block_dim)
#define gridDim (::lpa_emu::grid_dim)
#define __syncthreads() ::lpa_emu::syncthreads()
#define __syncthreads_or(p) ::lpa_emu::syncthreads_or(p)
// Blocks run one after another, so a fence has nothing to order across blocks; atomics may still meet
// the threads of one block.
#define __threadfence() std::atomic_thread_fence(std::memory_order_seq_cst)
template <typename T> T __ldcg(const T* p) { return *p; }
inline int atomicAdd(int* address, int value) { return std::atomic_ref<int>(*address).fetch_add(value); }
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  return std::atomic_ref<unsigned long long>(*address).fetch_add(value);
}
