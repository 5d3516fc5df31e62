// The fused one-token NSTM step (spec §2): plain C++ interface, no ATen / PyTorch headers.
//
// nstm_step.cu implements it (pure CUDA, compiles with nvcc alone); nstm_step.cpp binds it to
// PyTorch. The kernel updates the slot memory IN PLACE; the functional Python API clones first.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace nstm {

enum StepDType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Sizes the kernel supports (checked by nstm_step_check before every launch).
constexpr int kMaxSlots = 1024;   // S
constexpr int kMaxDim = 1024;     // K and V

struct StepParams {
  // one token per (batch row, head); every tensor contiguous
  const void* q;            // [B, H, K]  input dtype
  const void* k;            // [B, H, K]  input dtype
  const void* v;            // [B, H, V]  input dtype
  const float* logits;      // [B, H, S]  fp32 route logits
  const float* gate;        // [B, H]     fp32 write-gate logits
  float* state_k;           // [B, H, S, K] fp32, updated in place
  float* state_v;           // [B, H, S, V] fp32, updated in place
  void* o;                  // [B, H, V]  input dtype (output)
  // state-to-state attention, all null when there is none
  const float* w_q;         // [H, V, V] fp32
  const float* w_k;         // [H, V, V] fp32
  const float* s2s_gate;    // [H] fp32 (mix = sigmoid(gate))
  // absolute stream position of this token: *pos_dev when pos_dev is not null (decode with CUDA
  // graphs: the position lives on the device), else pos_host. The kernel never changes it.
  const int64_t* pos_dev;
  int64_t pos_host;
  int64_t comm_every;
  int B, H, S, K, V, top_k;
  float scale;
  int dtype;                // StepDType
};

// Threads per block for these sizes (a multiple of 32, at most 256).
inline int nstm_step_threads(int S, int K, int V) {
  return (S <= 128 && K <= 128 && V <= 128) ? 128 : 256;
}

// Dynamic shared memory (bytes) of one block; with_s2s sizes it for a period end. The layout is
// written out in nstm_step_kernel.cuh (keep both in step).
inline size_t nstm_step_smem_bytes(int S, int K, int V, int top_k, int threads, bool with_s2s) {
  size_t floats = 2 * (size_t)K + V + 2 * (size_t)S + top_k + 32;  // q, k, v, logits, p, w, red
  size_t ints = top_k;                                              // routed slot indices
  if (with_s2s) {
    const size_t nwarps = threads / 32;
    floats += 2 * (size_t)S * (V + 1) + nwarps * ((size_t)V + S);   // V^ W_k, V^ W_v, row scratch
  }
  return 4 * (floats + ints);
}

// Checks sizes and the device's shared memory. Returns 0 when the launch is supported, else
// writes a one-line reason into err (errlen bytes) and returns non-zero.
int nstm_step_check(const StepParams& p, int device, char* err, size_t errlen);

// Launches one block per (batch row, head) on `stream` (a cudaStream_t). Returns 0, or a non-zero
// code with a one-line message in err.
int nstm_step_launch(const StepParams& p, void* stream, char* err, size_t errlen);

}  // namespace nstm
