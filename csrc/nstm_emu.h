// A CPU stand-in for the few CUDA primitives nstm_step_kernel.cuh uses, so that the kernel's code
// runs (slowly) on a machine without a GPU: one std::thread per CUDA thread, std::barrier for
// __syncthreads and __syncwarp, warp reductions through a per-warp scratch row. For tests only
// (nstm_step_emu.cpp); never part of the extension.
#pragma once

#include <barrier>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)

namespace nstm_emu {

struct Dim { unsigned x = 0, y = 0, z = 0; };

struct Block {
  std::unique_ptr<std::barrier<>> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> scratch;  // [nwarps, 32]
  std::vector<unsigned char> smem;
};

inline thread_local Dim tl_thread, tl_block, tl_dim;
inline thread_local Block* tl_blk = nullptr;

inline void syncthreads() { tl_blk->all->arrive_and_wait(); }
inline void syncwarp() { tl_blk->warps[tl_thread.x / 32]->arrive_and_wait(); }

template <bool kMax>
inline float warp_reduce(float x) {
  const unsigned w = tl_thread.x / 32, lane = tl_thread.x % 32;
  float* row = tl_blk->scratch.data() + 32 * w;
  row[lane] = x;
  syncwarp();
  float r = row[0];
  for (int i = 1; i < 32; ++i) r = kMax ? std::fmax(r, row[i]) : r + row[i];
  syncwarp();
  return r;
}
inline float warp_sum(float x) { return warp_reduce<false>(x); }
inline float warp_max(float x) { return warp_reduce<true>(x); }

// Runs kernel(args...) as a grid of `blocks` blocks of `threads` threads with `smem` bytes of
// dynamic shared memory; blocks one after another.
template <typename F>
void launch(int blocks, int threads, size_t smem, F kernel) {
  for (int b = 0; b < blocks; ++b) {
    Block blk;
    blk.all = std::make_unique<std::barrier<>>(threads);
    for (int w = 0; w < threads / 32; ++w) blk.warps.push_back(std::make_unique<std::barrier<>>(32));
    blk.scratch.assign(32 * (threads / 32), 0.0f);
    blk.smem.assign(smem, 0xff);  // NaN-ish garbage: the kernel must write before it reads
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        tl_thread.x = t;
        tl_block.x = b;
        tl_dim.x = threads;
        tl_blk = &blk;
        kernel();
      });
    }
    for (auto& th : pool) th.join();
  }
}

}  // namespace nstm_emu

#define threadIdx (nstm_emu::tl_thread)
#define blockIdx (nstm_emu::tl_block)
#define blockDim (nstm_emu::tl_dim)
#define __syncthreads() nstm_emu::syncthreads()
#define __syncwarp() nstm_emu::syncwarp()
#define NSTM_EXTERN_SMEM(name) unsigned char* name = nstm_emu::tl_blk->smem.data()
