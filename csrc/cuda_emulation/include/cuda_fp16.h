// Stand-in for the CUDA toolkit header of this name in the host emulation build.
#pragma once
#include "../cuda_emulation.h"
