// The CUDA step kernel's code run on the CPU (see nstm_emu.h), fp32 only, for the tests:
//   g++ -std=c++20 -O1 -shared -fPIC -pthread -DNSTM_CPU_EMU nstm_step_emu.cpp -o libnstm_step_emu.so
// The tests call nstm_step_emu through ctypes and compare it with the PyTorch step.
#include "nstm_step_kernel.cuh"

extern "C" int nstm_step_emu(const float* q, const float* k, const float* v, const float* logits,
                             const float* gate, float* state_k, float* state_v, float* o,
                             const float* w_q, const float* w_k,
                             const float* s2s_gate, const int64_t* pos_dev, int64_t pos_host,
                             int64_t comm_every, int B, int H, int S, int K, int V, int top_k,
                             float scale) {
  nstm::StepParams p{};
  p.q = q; p.k = k; p.v = v; p.logits = logits; p.gate = gate;
  p.state_k = state_k; p.state_v = state_v; p.o = o;
  p.w_q = w_q; p.w_k = w_k; p.s2s_gate = s2s_gate;
  p.pos_dev = pos_dev; p.pos_host = pos_host; p.comm_every = comm_every;
  p.B = B; p.H = H; p.S = S; p.K = K; p.V = V; p.top_k = top_k; p.scale = scale;
  p.dtype = nstm::kFloat32;
  if (S < 1 || S > nstm::kMaxSlots || K < 1 || K > nstm::kMaxDim || V < 1 || V > nstm::kMaxDim ||
      top_k < 1 || top_k > S || comm_every < 1)
    return 1;
  const int threads = nstm::nstm_step_threads(S, K, V);
  const bool with_s2s = w_q != nullptr && (pos_dev != nullptr || (pos_host + 1) % comm_every == 0);
  const size_t smem = nstm::nstm_step_smem_bytes(S, K, V, top_k, threads, with_s2s);
  nstm_emu::launch(B * H, threads, smem, [&] { nstm::nstm_step_kernel<float>(p); });
  return 0;
}
