// Compile-time facts about this build of uniformer_kernels._C (see build_info.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace uniformer_kernels {

pybind11::dict build_info();

}  // namespace uniformer_kernels
