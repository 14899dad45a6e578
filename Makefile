# The two commands (see README):
#   make          set up .venv (torch 2.13.0 CPU, triton), build the extension, run the quick benchmark suite,
#                 then the digits demo (make bench / make demo: each alone)
#   make test     set up and build if needed, then run the whole test suite, the Triton kernels under the
#                 interpreter and the CUDA kernels under the CPU emulation (make test-cuda-emu alone)
# CI (.ci/run) calls `make test` and then `make ci-extra`.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
# torch stays pinned: a bare `torch` would pull a CUDA build with several GB of packages.
DEPS    := torch==2.13.0 triton==3.9.0 numpy pybind11 ninja pytest pytest-benchmark matplotlib setuptools wheel \
           scikit-learn tqdm
SOURCES := $(shell awk '$$1 !~ /^\#/ && NF == 2 {print $$2}' csrc/sources.txt) $(wildcard csrc/*.h csrc/*/*.h csrc/*/*.cuh) setup.py

.PHONY: all setup build test bench demo ci-extra cmake-build cuda-sources inspect gpu-check clean cuda-emu \
        test-cuda-emu

all: bench demo

setup: $(VENV)/.deps-installed

$(VENV)/.deps-installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(DEPS)
	touch $@

# The dmf paper workflow's libraries (prepare, sample decoding, evaluate). torch-fidelity without its
# dependencies: it lists torchvision, whose PyPI wheels need CUDA torch libraries and do not load beside
# the CPU torch; dmf evaluate uses only its Inception, which needs torch alone.
DMF_DEPS := diffusers pillow
$(VENV)/.deps-dmf: $(VENV)/.deps-installed
	$(PY) -m pip install -q $(DMF_DEPS)
	$(PY) -m pip install -q --no-deps torch-fidelity==0.4.0
	touch $@

build: $(VENV)/.built $(VENV)/.deps-dmf

$(VENV)/.built: $(VENV)/.deps-installed $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import dmf_kernels; print('dmf_kernels', dmf_kernels.__version__, dmf_kernels.build_info())"
	touch $@

# The Triton kernels run on the CPU only under the interpreter, which must be set before
# triton is imported: a second pytest process for those files.
TRITON_TESTS := tests/kernels/test_attention_triton.py tests/kernels/test_attention_triton_rope.py \
                tests/kernels/test_gelu_triton.py tests/kernels/test_bad_input.py \
                tests/kernels/test_attention_bad_input.py tests/kernels/test_attention_mask_gqa.py
test: build cuda-emu
	$(PY) -m pytest tests -q --ignore=tests/cuda_emu
	TRITON_INTERPRET=1 $(PY) -m pytest $(TRITON_TESTS) -q
	$(MAKE) test-cuda-emu

# The CUDA kernels (csrc/cuda/*.cu) on the CPU: compiled by g++ against the SIMT emulation of
# csrc/emu into build-emu/<variant>/libdmf_cuda_emu.so (+ emu_selftest), then (1) the emulator's
# self-test and the op tests (float64 references, three-way bound, every launch class) against the
# CUDA kernels under a seeded priority schedule, (2) the launch classes again under a seeded random
# schedule, (3) both once more built with AddressSanitizer + UBSan, (4) the mutation check: copies of
# the sources with injected GPU bugs must each fail. Any failure or emulator report fails the target.
EMU_BUILD := $(PY) csrc/emu/build.py --selftest
# Sanitizer reports are written to file descriptor 2 and end the process: pytest's default fd
# capture would swallow them with it, so capture Python's sys streams only.
EMU_CAPTURE := --capture=sys
EMU_OP_TESTS := tests/kernels/test_adaln.py tests/kernels/test_gated_residual.py tests/kernels/test_rms_norm.py tests/kernels/test_ops.py
EMU_OP_TESTS += tests/kernels/test_rms_adaln.py tests/kernels/test_compile.py
EMU_OP_TESTS += tests/kernels/test_swiglu.py tests/kernels/test_rope.py
EMU_OP_TESTS += tests/kernels/test_bad_input.py tests/kernels/test_gradcheck.py
ASAN_ENV = LD_PRELOAD=$$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \
           DMF_KERNELS_CUDA_EMU_LIB=build-emu/sanitize/libdmf_cuda_emu.so \
           DMF_KERNELS_CUDA_EMU_SELFTEST=build-emu/sanitize/emu_selftest

cuda-emu: setup
	$(EMU_BUILD)

test-cuda-emu: build cuda-emu
	DMF_KERNELS_CUDA_EMU=priority:1 $(PY) -m pytest tests/cuda_emu $(EMU_OP_TESTS) -q -k "not 257" $(EMU_CAPTURE)
	DMF_KERNELS_CUDA_EMU=random:7 $(PY) -m pytest tests/cuda_emu/test_launch_classes.py -q $(EMU_CAPTURE)
	$(EMU_BUILD) --variant sanitize
	$(ASAN_ENV) DMF_KERNELS_CUDA_EMU=reverse:0 $(PY) -m pytest tests/cuda_emu -q -p no:cacheprovider $(EMU_CAPTURE)
	$(PY) tests/cuda_emu/mutants.py

bench: build
	$(PY) -m benchmarks.run --quick

# The dmf package on the digits set: flow model, conversion, DMF, then FD / accuracy / speed (~10 min, 2 cores).
demo: build
	$(PY) -m dmf demo --out runs/demo

# Second build path (CMake), the nvcc compile of every .cu (sm_80, sm_90a), and the
# machine-code gate (make inspect).
ci-extra: cmake-build cuda-sources inspect

cmake-build: build
	rm -rf build-cmake
	cmake -S . -B build-cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY)) > build-cmake.log 2>&1 || (cat build-cmake.log; exit 1)
	cmake --build build-cmake >> build-cmake.log 2>&1 || (cat build-cmake.log; exit 1)
	$(PY) .ci/smoke_cmake_build.py build-cmake/_C*.so

cuda-sources: setup
	PYTHON=$(PY) .ci/check_cuda_sources.sh

# Machine code of every kernel without a GPU: Triton 3.6 (the GPU machines' version; needs
# numpy < 2.3) in its own venv compiles the attention kernels for sm_90a and sm_80, nvcc
# -Xptxas -v the .cu files; writes benchmarks/results/inspect_<target>.md and fails when a
# hot configuration spills, loses vector loads, cp.async or tensor-core ops (CI gate).
INSPECT_VENV ?= .venv-inspect
INSPECT_DEPS := torch==2.13.0 triton==3.6.0 'numpy<2.3'

$(INSPECT_VENV)/.deps-installed:
	$(PYTHON) -m venv $(INSPECT_VENV)
	$(INSPECT_VENV)/bin/python -m pip install -q --upgrade pip
	$(INSPECT_VENV)/bin/python -m pip install -q $(INSPECT_DEPS)
	touch $@

inspect: $(INSPECT_VENV)/.deps-installed
	$(INSPECT_VENV)/bin/python benchmarks/inspect_kernels.py --check

# On a CUDA machine: build with CUDA, run CUDA tests and benchmarks (benchmarks/gpu_check.sh).
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build build-emu build-cmake build-cmake.log *.egg-info dmf_kernels/_C*.so $(VENV)/.built $(INSPECT_VENV)
