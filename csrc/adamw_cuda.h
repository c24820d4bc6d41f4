// C interface of the CUDA Adam/AdamW kernels (adamw.cu): plain structs and functions, no torch
// or CUDA headers, so the bindings (optim_cuda.cpp) and nvcc compile checks need nothing else.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum { QF_FLOAT32 = 0, QF_BFLOAT16 = 1, QF_FLOAT16 = 2 };

// One tensor of an fp32-state update. `p` and `g` have the launch's dtype; all on one device.
typedef struct {
  void* p;
  const void* g;
  float* exp_avg;
  float* exp_avg_sq;
  int64_t n;
  int64_t step;
} QfAdam32Tensor;

// One tensor of an 8-bit-state update: codes are n bytes, absmax ceil(n/256) floats.
typedef struct {
  void* p;
  const void* g;
  uint8_t* m_codes;
  uint8_t* v_codes;
  float* m_absmax;
  float* v_absmax;
  int64_t n;
  int64_t step;
} QfAdam8Tensor;

typedef struct {
  double lr, beta1, beta2, eps, weight_decay;
  int decoupled;  // 1: AdamW, 0: Adam with L2 weight decay
} QfAdamHyper;

// Launch the updates of `count` tensors of dtype `dtype` on `stream` (a cudaStream_t; NULL for
// the legacy default stream). Returns 0 or a cudaError_t value (see qf_cuda_error_string).
int qf_adam32_cuda(const QfAdam32Tensor* tensors, int count, int dtype, QfAdamHyper hyper, void* stream);
// `signed_map` / `unsigned_map`: device pointers to the 256 sorted fp32 code values.
int qf_adam8bit_cuda(const QfAdam8Tensor* tensors, int count, int dtype, const float* signed_map,
                     const float* unsigned_map, QfAdamHyper hyper, void* stream);
const char* qf_cuda_error_string(int error);

#ifdef __cplusplus
}
#endif
