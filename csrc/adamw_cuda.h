// Interface of the CUDA Adam/AdamW kernels (adamw.cu): plain structs and extern "C" launchers, no
// torch or CUDA headers, so the bindings (optim_cuda.cpp) and nvcc compile checks need nothing else.
//
// A launch updates every tensor of one table in device memory (multi-tensor apply): `count`
// entries, each a tensor or a slice of one with its pointers, length and scalars, and
// `chunk_start[count]`, the first CUDA block of each entry (a prefix sum of its chunks of
// kQfChunk32 / kQfChunk8 elements). The host builds all tables of a step in one pinned buffer and
// copies it with one asynchronous copy: the launch count does not grow with the tensor count.
#pragma once

#include <stdint.h>

#include "adam_common.h"

enum { QF_FLOAT32 = 0, QF_BFLOAT16 = 1, QF_FLOAT16 = 2 };

constexpr int64_t kQfChunk32 = 16384;                       // elements per CUDA block, fp32 states
constexpr int64_t kQfChunk8 = 32 * qlora_fast::kQuantBlock;  // 8 warps x 4 quant blocks, 8-bit states

// One tensor (or slice) of an fp32-state update. `p` and `g` have the launch's dtype.
struct QfAdam32Entry {
  void* p;
  const void* g;
  float* exp_avg;
  float* exp_avg_sq;
  int64_t n;
  qlora_fast::AdamScalars s;
};

// One tensor (or slice starting at a multiple of 256) of an 8-bit-state update: codes are n
// bytes, absmax ceil(n/256) floats.
struct QfAdam8Entry {
  void* p;
  const void* g;
  uint8_t* m_codes;
  uint8_t* v_codes;
  float* m_absmax;
  float* v_absmax;
  int64_t n;
  qlora_fast::AdamScalars s;
};

extern "C" {
// Launch the updates of a table of `count` entries of dtype `dtype` (`chunks` CUDA blocks in all)
// on `stream` (a cudaStream_t). `table` and `chunk_start` are device pointers. Returns 0 or a
// cudaError_t value (see qf_cuda_error_string).
int qf_adam32_cuda(const QfAdam32Entry* table, const int* chunk_start, int count, int chunks, int dtype,
                   void* stream);
// `signed_map` / `unsigned_map`: device pointers to the 256 sorted fp32 code values; `nonfinite`:
// an int32 on the device set to 1 when a new block absmax is not finite (may be NULL).
int qf_adam8bit_cuda(const QfAdam8Entry* table, const int* chunk_start, int count, int chunks, int dtype,
                     const float* signed_map, const float* unsigned_map, int* nonfinite, void* stream);
const char* qf_cuda_error_string(int error);
}
