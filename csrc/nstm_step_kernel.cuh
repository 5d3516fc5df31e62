// The fused one-token NSTM step kernel (spec §2 steps 1-4), one block per (batch row, head).
//
// Included by nstm_step.cu (nvcc) and, with NSTM_CPU_EMU defined, by nstm_step_emu.cpp, which runs
// the same code on the CPU (one std::thread per CUDA thread) so that its logic is tested without a
// GPU. Keep to the primitives nstm_emu.h provides: threadIdx/blockIdx/blockDim, __syncthreads,
// __syncwarp, warp_sum/warp_max, the shared-memory macro and load_f/store_f.
//
// Per block: (1) load q, k, v and the S route logits; (2) routing: the top_k logits by rank
// (ties go to the lower slot index; a NaN ranks above every number, as in torch.sort, and makes
// the token's weights NaN), softmax over them, times sigmoid(gate); (3) the gated convex
// write into the top_k routed slots only, in place in global memory; (4) the read: scores over all
// S slots, softmax, o = p V^; (5) when this token ends a period ((pos + 1) % C == 0) and there is
// an s2s: V^ <- (1 - g) V^ + g A V^ with A = softmax((V^ W_q)(V^ W_k)^T / sqrt(V)) and
// g = sigmoid(gate_h), with V^ W_k and a copy of V^ staged in shared memory and one warp per slot
// row. Accumulation is fp32 throughout.
#pragma once

#include <math.h>
#include <stdint.h>

#include "nstm_step.h"

#ifdef NSTM_CPU_EMU
#include "nstm_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define NSTM_EXTERN_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace nstm {

#ifdef NSTM_CPU_EMU
inline float warp_sum(float x) { return nstm_emu::warp_sum(x); }
inline float warp_max(float x) { return nstm_emu::warp_max(x); }
inline float load_f(const float* p, int64_t i) { return p[i]; }
inline void store_f(float* p, int64_t i, float x) { p[i] = x; }
#else
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float load_f(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load_f(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store_f(float* p, int64_t i, float x) { p[i] = x; }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, int64_t i, float x) { p[i] = __float2bfloat16(x); }
__device__ __forceinline__ void store_f(__half* p, int64_t i, float x) { p[i] = __float2half(x); }
#endif

// Block-wide max (kMax) or sum of one value per thread; every thread gets the result. Contains two
// __syncthreads, so every thread of the block must call it.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float x, float* red, int lane, int warp, int nwarps) {
  x = kMax ? warp_max(x) : warp_sum(x);
  if (lane == 0) red[warp] = x;
  __syncthreads();
  float r = kMax ? -INFINITY : 0.0f;
  for (int w = 0; w < nwarps; ++w) r = kMax ? fmaxf(r, red[w]) : r + red[w];
  __syncthreads();
  return r;
}

template <typename T>
__global__ void __launch_bounds__(256) nstm_step_kernel(StepParams p) {
  NSTM_EXTERN_SMEM(smem_raw);
  const int S = p.S, K = p.K, V = p.V, top_k = p.top_k;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, nwarps = nt >> 5;
  const int64_t bh = blockIdx.x;                       // batch row * H + head
  const int h = (int)(bh % p.H);

  // shared memory, in the order nstm_step_smem_bytes counts it
  float* sq = reinterpret_cast<float*>(smem_raw);      // [K] query
  float* sk = sq + K;                                   // [K] write key
  float* sv = sk + K;                                   // [V] write value
  float* slog = sv + V;                                 // [S] route logits
  float* sp = slog + S;                                 // [S] read scores, then p
  float* sel_w = sp + S;                                // [top_k] write weights
  float* red = sel_w + top_k;                           // [32] reduction scratch
  int* sel_idx = reinterpret_cast<int*>(red + 32);      // [top_k] routed slots, by rank
  float* big = reinterpret_cast<float*>(sel_idx + top_k);  // s2s only (see below)

  const T* q = static_cast<const T*>(p.q) + bh * K;
  const T* k = static_cast<const T*>(p.k) + bh * K;
  const T* v = static_cast<const T*>(p.v) + bh * V;
  const float* logits = p.logits + bh * S;
  float* Ks = p.state_k + bh * S * K;                   // this (row, head)'s slot keys [S, K]
  float* Vs = p.state_v + bh * S * V;                   // slot values [S, V]
  T* o = static_cast<T*>(p.o) + bh * V;

  const int64_t pos = p.pos_dev != nullptr ? *p.pos_dev : p.pos_host;
  const bool event = p.w_q != nullptr && (pos + 1) % p.comm_every == 0;

  // (1) inputs to fp32 in shared memory (NaN logits kept: they rank first and poison the weights)
  for (int i = tid; i < K; i += nt) {
    sq[i] = load_f(q, i);
    sk[i] = load_f(k, i);
  }
  for (int i = tid; i < V; i += nt) sv[i] = load_f(v, i);
  for (int i = tid; i < S; i += nt) {
    const float x = logits[i];
    slog[i] = x;
  }
  __syncthreads();

  // (2) top-k by rank: the ranks are a permutation of 0..S-1 (ties broken by slot index)
  for (int i = tid; i < S; i += nt) {
    const float xi = slog[i];
    int rank = 0;
    for (int j = 0; j < S; ++j) {
      const float xj = slog[j];
      // j ranks above i: NaN above any number, then larger, then (a tie) the lower index
      const bool nj = isnan(xj), ni = isnan(xi);
      rank += (nj && !ni) || (nj == ni && ((xj > xi) || ((xj == xi || nj) && j < i)));
    }
    if (rank < top_k) sel_idx[rank] = i;
  }
  __syncthreads();
  if (warp == 0) {                                      // softmax over the selected, times beta
    const float m = slog[sel_idx[0]];
    float part = 0.0f;
    for (int r = lane; r < top_k; r += 32) part += expf(slog[sel_idx[r]] - m);
    const float denom = warp_sum(part);
    const float beta = 1.0f / (1.0f + expf(-p.gate[bh]));
    for (int r = lane; r < top_k; r += 32) sel_w[r] = beta * (expf(slog[sel_idx[r]] - m) / denom);
  }
  __syncthreads();

  // (3) gated convex write, routed slots only (the other rows are not touched)
  for (int e = tid; e < top_k * K; e += nt) {
    const int r = e / K, d = e - r * K;
    const float w = sel_w[r];
    float* x = Ks + (int64_t)sel_idx[r] * K + d;
    *x = (1.0f - w) * *x + w * sk[d];
  }
  for (int e = tid; e < top_k * V; e += nt) {
    const int r = e / V, d = e - r * V;
    const float w = sel_w[r];
    float* x = Vs + (int64_t)sel_idx[r] * V + d;
    *x = (1.0f - w) * *x + w * sv[d];
  }
  __syncthreads();  // the block's global writes are visible to the block after this

  // (4) read: scale q.K^_i for every slot (one warp per slot), softmax, o = p V^
  for (int s = warp; s < S; s += nwarps) {
    float part = 0.0f;
    for (int d = lane; d < K; d += 32) part += sq[d] * Ks[(int64_t)s * K + d];
    part = warp_sum(part);
    if (lane == 0) sp[s] = part * p.scale;
  }
  __syncthreads();
  float lm = -INFINITY;
  for (int s = tid; s < S; s += nt) lm = fmaxf(lm, sp[s]);
  const float smax = block_reduce<true>(lm, red, lane, warp, nwarps);
  float ls = 0.0f;
  for (int s = tid; s < S; s += nt) {
    const float e = expf(sp[s] - smax);
    sp[s] = e;
    ls += e;
  }
  const float inv_total = 1.0f / block_reduce<false>(ls, red, lane, warp, nwarps);
  for (int s = tid; s < S; s += nt) sp[s] *= inv_total;
  __syncthreads();
  for (int c = tid; c < V; c += nt) {
    float acc = 0.0f;
    for (int s = 0; s < S; ++s) acc += sp[s] * Vs[(int64_t)s * V + c];
    store_f(o, c, acc);
  }

  // (5) state-to-state attention at a period end (after the read, values only)
  if (event) {
    __syncthreads();                                    // every read of V^ above is done
    const int Vp = V + 1;                               // padded rows: no bank conflicts
    float* kk = big;                                    // [S, V+1]  V^ W_k
    float* vv = kk + (int64_t)S * Vp;                   // [S, V+1]  a copy of V^
    float* qrow = vv + (int64_t)S * Vp + warp * V;      // [V] this warp's row of V^ W_q
    float* arow = vv + (int64_t)S * Vp + nwarps * V + warp * S;  // [S] its attention row
    const float* wq = p.w_q + (int64_t)h * V * V;
    const float* wk = p.w_k + (int64_t)h * V * V;
    for (int e = tid; e < S * V; e += nt) {
      const int i = e / V, c = e - i * V;
      float ak = 0.0f;
      for (int d = 0; d < V; ++d) ak += Vs[(int64_t)i * V + d] * wk[d * V + c];
      kk[i * Vp + c] = ak;
      vv[i * Vp + c] = Vs[(int64_t)i * V + c];
    }
    __syncthreads();
    const float mix = 1.0f / (1.0f + expf(-p.s2s_gate[h]));
    const float qk_scale = 1.0f / sqrtf((float)V);
    // row i of V^ is read and then rewritten by one warp only; kk/vv hold the old V^ (products, copy)
    for (int i = warp; i < S; i += nwarps) {
      float* vi = Vs + (int64_t)i * V;
      for (int c = lane; c < V; c += 32) {
        float a = 0.0f;
        for (int d = 0; d < V; ++d) a += vi[d] * wq[d * V + c];
        qrow[c] = a;
      }
      __syncwarp();
      float am = -INFINITY;
      for (int j = lane; j < S; j += 32) {
        float a = 0.0f;
        for (int c = 0; c < V; ++c) a += qrow[c] * kk[j * Vp + c];
        a *= qk_scale;
        arow[j] = a;
        am = fmaxf(am, a);
      }
      am = warp_max(am);
      float as = 0.0f;
      for (int j = lane; j < S; j += 32) {
        const float e = expf(arow[j] - am);
        arow[j] = e;
        as += e;
      }
      const float inv = 1.0f / warp_sum(as);
      __syncwarp();
      for (int c = lane; c < V; c += 32) {
        float a = 0.0f;
        for (int j = 0; j < S; ++j) a += arow[j] * vv[j * Vp + c];
        vi[c] = (1.0f - mix) * vv[i * Vp + c] + mix * (a * inv);
      }
      __syncwarp();
    }
  }
}

}  // namespace nstm
