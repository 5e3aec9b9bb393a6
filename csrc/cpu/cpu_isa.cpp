#include "cpu_isa.h"

namespace uniformer_kernels {

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

const char* cpu_kernel_isa() { return cpu_has_avx2_fma() ? "avx2" : "baseline"; }

}  // namespace uniformer_kernels
