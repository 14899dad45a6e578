// Stand-in for CUDA's cuda_runtime.h under the CPU emulation (see dmf_emu.h).
#pragma once
#include "dmf_emu.h"
