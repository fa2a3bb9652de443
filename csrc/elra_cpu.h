// elra_cpu.h: what the CPU kernels of elra_ops.cpp and elra_adam_ops.cpp share about the
// machine: the instruction sets they may use (capped by ELRA_CPU_ISA) and the cloning macro.
#pragma once

#include <cstdlib>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace elra {

// [note: vectorization] The inner loops are plain functions with restrict pointers (inside a
// lambda the captured pointers may alias the stores, which stops the vectorizer) and are cloned
// for AVX2+FMA with a generic fallback picked at load time (GCC target_clones), so a portable
// build still runs at the speed of the machine.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ELRA_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define ELRA_CLONES
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define ELRA_HAVE_AVX2_PATH 1

// ELRA_CPU_ISA=avx2 or =generic (read once) caps the instruction set the kernels use, so that
// the tests can run every code path on a machine that has them all.
inline int isa_cap() {
  static const int cap = [] {
    const char* v = std::getenv("ELRA_CPU_ISA");
    if (v == nullptr) return 2;
    const std::string s(v);
    return s == "generic" ? 0 : (s == "avx2" ? 1 : 2);
  }();
  return cap;
}

inline bool cpu_has_avx2() {
  static const bool ok =
      isa_cap() >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

inline bool cpu_has_avx512() {
  static const bool ok = isa_cap() >= 2 && __builtin_cpu_supports("avx512f");
  return ok;
}
#endif  // ELRA_HAVE_AVX2_PATH

}  // namespace elra
