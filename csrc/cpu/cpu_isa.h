// Which build of the CPU kernels this CPU runs. The ISA-specific kernels (depthwise_kernels_*,
// attention_kernels_*) exist for the baseline ISA and for AVX2 + FMA; their callers pick one with
// this at run time, so the extension runs on any x86-64 CPU and uses FMA where there is one.
#pragma once

namespace uniformer_kernels {

bool cpu_has_avx2_fma();

// "avx2" or "baseline" (for the environment report).
const char* cpu_kernel_isa();

}  // namespace uniformer_kernels
