// The Python module uniformer_kernels._C. Kept to the pybind11 entry point: ops register
// themselves with TORCH_LIBRARY / TORCH_LIBRARY_IMPL in their own files, which needs no entry here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "attention_kernels.h"
#include "build_info.h"
#include "cpu_isa.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "uniformer_kernels compiled kernels (CPU always, CUDA when built with it)";
  m.def("build_info", &uniformer_kernels::build_info,
        "Compile-time facts about this build: CUDA, archs, OpenMP, SIMD, compiler, torch version.");
  m.def("cpu_kernel_isa", &uniformer_kernels::cpu_kernel_isa,
        "The instruction set of the CPU kernels chosen for this process: baseline, avx2 or avx512 (the widest "
        "this CPU runs, or UNIFORMER_KERNELS_CPU_ISA's; ValueError when that names one it lacks).");
  m.def("cpu_isas_supported", &uniformer_kernels::supported_cpu_isas,
        "The CPU kernel builds this CPU and OS can run, narrowest first.");
  m.def("cpu_attention_available", &uniformer_kernels::available_cpu_attention,
        "Whether torch links the BLAS gemm that the CPU attention kernel calls.");
}
