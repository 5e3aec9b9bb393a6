// Which build of the CPU kernels this process runs. The ISA-specific kernels (depthwise_kernels_*,
// attention_kernels_*) are compiled for the baseline ISA, AVX2 + FMA and AVX-512 (F, BW, VL); one
// is chosen once per process: the widest this CPU and its OS support, or the one the environment
// variable UNIFORMER_KERNELS_CPU_ISA (baseline, avx2, avx512) forces.
#pragma once

#include <string>
#include <vector>

namespace uniformer_kernels {

enum class CpuIsa { baseline, avx2, avx512 };

// The chosen ISA (decided on the first call). Throws c10::ValueError, naming the variable, when
// UNIFORMER_KERNELS_CPU_ISA is not one of the names or forces an ISA this CPU/OS lacks.
CpuIsa chosen_cpu_isa();

// Its name, for the environment report.
const char* cpu_kernel_isa();

// The ISAs the kernels were compiled for, and the ones this CPU and OS can run, narrowest first.
std::vector<std::string> compiled_cpu_isas();
std::vector<std::string> supported_cpu_isas();

}  // namespace uniformer_kernels
