// CPU feature detection (cpuid, and xgetbv for the register state the OS saves) and the choice of
// the kernels' ISA. The compiler's __builtin_cpu_supports reads cpuid only: an OS that does not
// save zmm registers across context switches (XCR0) would crash AVX-512 code it reports as usable.
#include "cpu_isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define UK_X86_KERNELS 1
#else
#define UK_X86_KERNELS 0
#endif

namespace uniformer_kernels {
namespace {

constexpr const char* kEnvVar = "UNIFORMER_KERNELS_CPU_ISA";
constexpr const char* kNames[] = {"baseline", "avx2", "avx512"};

const char* name(CpuIsa isa) { return kNames[static_cast<int>(isa)]; }

#if UK_X86_KERNELS
// XCR0: which register state the OS saves (and so lets programs use).
unsigned long long xcr0() {
  unsigned int eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}
#endif

// The widest ISA this CPU and OS run.
CpuIsa widest_supported() {
#if UK_X86_KERNELS
  unsigned int eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return CpuIsa::baseline;
  const bool osxsave = ecx & (1u << 27), avx = ecx & (1u << 28), fma = ecx & (1u << 12);
  if (!osxsave || !avx) return CpuIsa::baseline;
  const unsigned long long saved = xcr0();
  if ((saved & 0x6) != 0x6) return CpuIsa::baseline;  // xmm and ymm state
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return CpuIsa::baseline;
  const bool avx2 = ebx & (1u << 5);
  if (!avx2 || !fma) return CpuIsa::baseline;
  const bool avx512 = (ebx & (1u << 16)) && (ebx & (1u << 30)) && (ebx & (1u << 31));  // F, BW, VL
  const bool zmm_state = (saved & 0xE0) == 0xE0;  // opmask, upper halves of zmm0-15, zmm16-31
  return avx512 && zmm_state ? CpuIsa::avx512 : CpuIsa::avx2;
#else
  return CpuIsa::baseline;  // the "avx2"/"avx512" builds are baseline code off x86-64
#endif
}

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

CpuIsa choose() {
  const CpuIsa widest = widest_supported();
  const char* forced = std::getenv(kEnvVar);
  if (forced == nullptr || forced[0] == '\0') return widest;
  for (int i = 0; i < 3; ++i) {
    if (std::strcmp(forced, kNames[i]) != 0) continue;
    TORCH_CHECK_VALUE(i <= static_cast<int>(widest), kEnvVar, "=", forced,
                      " but this CPU (or its OS, which must save the vector registers) does not support ", forced,
                      "; supported here: ", joined(supported_cpu_isas()), ". Unset ", kEnvVar,
                      " to use the widest.");
    return static_cast<CpuIsa>(i);
  }
  TORCH_CHECK_VALUE(false, kEnvVar, " must be one of baseline, avx2, avx512 (or unset), got '", forced, "'");
}

}  // namespace

CpuIsa chosen_cpu_isa() {
  static const CpuIsa chosen = choose();  // a throwing first call is retried (and throws) next time
  return chosen;
}

const char* cpu_kernel_isa() { return name(chosen_cpu_isa()); }

std::vector<std::string> compiled_cpu_isas() {
#if UK_X86_KERNELS
  return {"baseline", "avx2", "avx512"};
#else
  return {"baseline"};
#endif
}

std::vector<std::string> supported_cpu_isas() {
  std::vector<std::string> out;
  for (int i = 0; i <= static_cast<int>(widest_supported()); ++i) out.push_back(kNames[i]);
  return out;
}

}  // namespace uniformer_kernels
