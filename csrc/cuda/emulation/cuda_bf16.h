// cuda_bf16.h (emulation): __nv_bfloat16 with the conversions elra_cuda.cu uses, computed on the
// CPU with round-to-nearest-even (NaN stays NaN), as __float2bfloat16_rn does on a GPU and
// c10::BFloat16 does on the CPU. See cuda_runtime.h.
#pragma once

#include <cstdint>
#include <cstring>

namespace elra_emu {

struct __nv_bfloat16 {
  uint16_t x;  // the upper 16 bits of a float32
};

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40u)};  // NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even (overflows to inf)
  return {static_cast<uint16_t>(u >> 16)};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = static_cast<uint32_t>(b.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace elra_emu

using elra_emu::__nv_bfloat16;
using elra_emu::__float2bfloat16_rn;
using elra_emu::__bfloat162float;
