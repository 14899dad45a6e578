// The Python module dmf_kernels._C: importing it runs the op registrations above; it
// exposes build_info() and the test hook _set_cpu_backend(). Macros come from setup.py /
// CMakeLists.txt.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include "kernels/backend.h"

#ifndef DMF_CUDA_ARCHS
#define DMF_CUDA_ARCHS ""
#endif
#ifndef DMF_CUDA_VERSION
#define DMF_CUDA_VERSION ""
#endif
#ifndef DMF_CPU_ARCH
#define DMF_CPU_ARCH "none"
#endif
#ifndef DMF_BUILD_TOOL
#define DMF_BUILD_TOOL "unknown"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "dmf_kernels compiled ops (registered as torch.ops.dmf_kernels.*)";
  m.def("build_info", []() {
    py::dict d;
    d["cpu"] = true;
    d["cuda"] = dmf::cuda_backend() != nullptr;
    d["cuda_archs"] = std::string(DMF_CUDA_ARCHS);
    d["cuda_version"] = std::string(DMF_CUDA_VERSION);
    d["torch_version"] = std::string(TORCH_VERSION);
#ifdef NDEBUG
    d["debug"] = false;
#else
    d["debug"] = true;
#endif
#ifdef __VERSION__
    d["compiler"] = std::string(__VERSION__);
#endif
    d["build_tool"] = std::string(DMF_BUILD_TOOL);
    d["cpu_arch"] = std::string(DMF_CPU_ARCH);
    return d;
  });
  // The address of a dmf::Backend table (csrc/kernels/backend.h) that serves CPU tensors from
  // now on, or 0 for the CPU kernels. For dmf_kernels.cuda_emu: the table comes from the
  // emulated-CUDA library built from this source tree (same struct layout).
  m.def("_set_cpu_backend", [](uintptr_t address) {
    dmf::set_cpu_override(reinterpret_cast<const dmf::Backend*>(address));
  });
}
