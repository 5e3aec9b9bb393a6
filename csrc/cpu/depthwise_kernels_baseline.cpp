// The depthwise conv family's CPU kernels for the baseline ISA (any x86-64 or other CPU).
#include "depthwise_kernels.h"

// 32-byte vectors without AVX are split into two SSE halves by the compiler; GCC warns that passing
// them by value would differ in ABI from an AVX build, which is moot for these inline helpers.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace uniformer_kernels {
namespace baseline {
#define UK_VECTOR_BYTES 32
#define UK_VECTOR_REGISTERS 16
#include "depthwise_kernels_impl.h"
}  // namespace baseline
}  // namespace uniformer_kernels
