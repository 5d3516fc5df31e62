// Host side of the fused one-token NSTM step: size checks and the launch, for fp32, bf16 and fp16
// inputs. Pure CUDA (no ATen headers): `nvcc -arch=sm_90 -c nstm_step.cu` builds it on its own.
#include <stdio.h>

#include "nstm_step_kernel.cuh"

namespace nstm {

namespace {

constexpr int kMaxDevices = 64;

int fail(char* err, size_t errlen, const char* msg) {
  if (err != nullptr && errlen > 0) snprintf(err, errlen, "%s", msg);
  return 1;
}

template <typename T>
int launch_typed(const StepParams& p, cudaStream_t stream, int threads, size_t smem, char* err,
                 size_t errlen) {
  // above 48 KiB the kernel must opt in; once per device and size (so that a launch inside a
  // CUDA-graph capture, after a warm-up launch, makes no further runtime calls)
  static size_t allowed[kMaxDevices] = {0};
  int dev = 0;
  if (smem > 48 * 1024 && cudaGetDevice(&dev) == cudaSuccess &&
      (dev < 0 || dev >= kMaxDevices || allowed[dev] < smem)) {
    cudaError_t e = cudaFuncSetAttribute(nstm_step_kernel<T>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (e != cudaSuccess) {
      snprintf(err, errlen, "nstm_step: cannot allow %zu bytes of shared memory: %s", smem,
               cudaGetErrorString(e));
      return 2;
    }
    if (dev >= 0 && dev < kMaxDevices) allowed[dev] = smem;
  }
  nstm_step_kernel<T><<<p.B * p.H, threads, smem, stream>>>(p);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    snprintf(err, errlen, "nstm_step: kernel launch failed: %s", cudaGetErrorString(e));
    return 3;
  }
  return 0;
}

}  // namespace

int nstm_step_check(const StepParams& p, int device, char* err, size_t errlen) {
  char msg[512];
  if (p.B < 1 || p.H < 1) return fail(err, errlen, "nstm_step: B and H must be >= 1");
  if (p.S < 1 || p.S > kMaxSlots) {
    snprintf(msg, sizeof msg, "nstm_step (CUDA): S = %d slots is not supported (1 <= S <= %d); "
             "use backend='triton' or 'chunked'", p.S, kMaxSlots);
    return fail(err, errlen, msg);
  }
  if (p.K < 1 || p.K > kMaxDim || p.V < 1 || p.V > kMaxDim) {
    snprintf(msg, sizeof msg, "nstm_step (CUDA): K = %d, V = %d are not supported (1 <= K, V <= %d); "
             "use backend='triton' or 'chunked'", p.K, p.V, kMaxDim);
    return fail(err, errlen, msg);
  }
  if (p.top_k < 1 || p.top_k > p.S) return fail(err, errlen, "nstm_step: need 1 <= top_k <= S");
  if (p.comm_every < 1) return fail(err, errlen, "nstm_step: comm_every must be >= 1");
  if (p.dtype != kFloat32 && p.dtype != kBFloat16 && p.dtype != kFloat16)
    return fail(err, errlen, "nstm_step (CUDA): inputs must be float32, bfloat16 or float16");
  if ((long long)p.B * p.H > 0x7fffffffLL) return fail(err, errlen, "nstm_step: B * H too large");
  // sized for a period end whenever there is an s2s, so that an unsupported size fails at once
  const int threads = nstm_step_threads(p.S, p.K, p.V);
  const size_t smem = nstm_step_smem_bytes(p.S, p.K, p.V, p.top_k, threads, p.w_q != nullptr);
  // the device's limit, queried once per device (no runtime calls on later launches, e.g. while
  // a CUDA graph is being captured)
  static int optin_cache[kMaxDevices] = {0};
  int optin = (device >= 0 && device < kMaxDevices) ? optin_cache[device] : 0;
  if (optin == 0) {
    cudaError_t e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (e != cudaSuccess) {
      snprintf(msg, sizeof msg, "nstm_step: cannot query the device: %s", cudaGetErrorString(e));
      return fail(err, errlen, msg);
    }
    if (device >= 0 && device < kMaxDevices) optin_cache[device] = optin;
  }
  if (smem > (size_t)optin) {
    snprintf(msg, sizeof msg, "nstm_step (CUDA): S = %d, K = %d, V = %d need %zu bytes of shared "
             "memory per block (the state-to-state attention stages 2 S (V + 1) floats), this "
             "device allows %d; use backend='triton' or 'chunked'", p.S, p.K, p.V, smem, optin);
    return fail(err, errlen, msg);
  }
  return 0;
}

int nstm_step_launch(const StepParams& p, void* stream, char* err, size_t errlen) {
  const int threads = nstm_step_threads(p.S, p.K, p.V);
  // a device-side position decides the period end inside the kernel: size for it whenever there
  // is an s2s; a host-side one is known here
  const bool has_s2s = p.w_q != nullptr;
  const bool with_s2s = has_s2s && (p.pos_dev != nullptr || (p.pos_host + 1) % p.comm_every == 0);
  const size_t smem = nstm_step_smem_bytes(p.S, p.K, p.V, p.top_k, threads, with_s2s);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case kFloat32: return launch_typed<float>(p, s, threads, smem, err, errlen);
    case kBFloat16: return launch_typed<__nv_bfloat16>(p, s, threads, smem, err, errlen);
    case kFloat16: return launch_typed<__half>(p, s, threads, smem, err, errlen);
    default: return fail(err, errlen, "nstm_step (CUDA): inputs must be float32, bfloat16 or float16");
  }
}

}  // namespace nstm
