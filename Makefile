# The two commands (see README):
#   make          set up .venv (torch 2.13.0 CPU, triton), build the extension, run the quick benchmark suite,
#                 then the digits demo (make bench / make demo: each alone)
#   make test     set up and build if needed, then run the whole test suite, the Triton kernels under the
#                 interpreter and the CUDA kernels under the CPU emulation (make test-cuda-emu alone)
#   make wheel    the binary wheel (CPU + CUDA kernels) against torch 2.14.1 (CUDA 13.0) in .venv-cu -> dist/
# CI (.ci/run) calls `make test`, `make ci-extra` and `make cuda-build`.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
# torch stays pinned: a bare `torch` would pull a CUDA build with several GB of packages.
DEPS    := torch==2.13.0 triton==3.9.0 numpy pybind11 ninja pytest pytest-benchmark pytest-xdist matplotlib setuptools \
           wheel scikit-learn tqdm
# pytest-xdist: the suites run in PYTEST_JOBS processes, one test file per process at a time (--dist loadfile: a
# file's module fixtures, e.g. a spawned 2-rank FSDP run, run once). Most tests are single-threaded Python and
# small kernels, so 2 processes on 2 cores cut the main suite's wall time by ~40% (see README, CI cost).
PYTEST_JOBS ?= 2
XDIST   := -n $(PYTEST_JOBS) --dist loadfile
# One torch thread per process when several share the cores: two 2-thread processes on 2 cores spin in
# OpenMP barriers (a 4-file sample: 97 s -> 76 s wall, 132 s -> 64 s user CPU). The kernels' multi-threaded
# splits are tested on purpose in tests/kernels/test_threads.py.
XDIST_ENV := $(if $(filter 1,$(PYTEST_JOBS)),,OMP_NUM_THREADS=1)
# torch.compile's Inductor cache per checkout: the default (/tmp/torchinductor_<user>) is shared by every
# checkout on the machine, and a graph compiled against another checkout's op schemas was served from it
# (an attention call with arguments this tree's op did not have).
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
SOURCES := $(shell awk '$$1 !~ /^\#/ && NF == 2 {print $$2}' csrc/sources.txt) $(wildcard csrc/*.h csrc/*/*.h csrc/*/*.cuh) setup.py

.PHONY: all setup build test bench demo ci-extra cmake-build cuda-sources inspect gpu-check clean cuda-emu \
        test-cuda-emu wheel sdist cuda-build test-cu test-wheel sanitize-cpu

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
# triton is imported: a second pytest process for those files. Of test_bad_input.py only the low-precision
# test reaches a Triton kernel (gelu_tanh's; float64 never does): the rest would repeat the C++ ops' cases.
TRITON_TESTS := tests/kernels/test_attention_triton.py tests/kernels/test_attention_triton_rope.py \
                tests/kernels/test_gelu_triton.py tests/kernels/test_bad_input.py::test_nan_and_empty_low_precision \
                tests/kernels/test_attention_bad_input.py tests/kernels/test_attention_mask_gqa.py
test: build cuda-emu
	$(XDIST_ENV) $(PY) -m pytest tests -q --ignore=tests/cuda_emu $(XDIST)
	$(XDIST_ENV) TRITON_INTERPRET=1 $(PY) -m pytest $(TRITON_TESTS) -q $(XDIST)
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
	$(XDIST_ENV) DMF_KERNELS_CUDA_EMU=priority:1 $(PY) -m pytest tests/cuda_emu $(EMU_OP_TESTS) -q -k "not 257" $(EMU_CAPTURE) $(XDIST)
	DMF_KERNELS_CUDA_EMU=random:7 $(PY) -m pytest tests/cuda_emu/test_launch_classes.py -q $(EMU_CAPTURE)
	$(EMU_BUILD) --variant sanitize
	$(ASAN_ENV) DMF_KERNELS_CUDA_EMU=reverse:0 $(PY) -m pytest tests/cuda_emu -q -p no:cacheprovider $(EMU_CAPTURE)
	$(PY) tests/cuda_emu/mutants.py

# The C++ CPU kernels (csrc/cpu through csrc/ops) built with AddressSanitizer + UBSan (setup.py's
# DMF_KERNELS_SANITIZE=1, aborting at the first report) into build-asan/, beside the package's own _C,
# and loaded in its place (DMF_KERNELS_C_LIB) for the op tests and the 2-rank FSDP worker. CPU kernels
# only (DMF_KERNELS_SKIP_CUDA). libstdc++ is preloaded with the ASan runtime: python itself does not
# link it, so ASan's __cxa_throw interceptor found no real function and the first C++ exception (any
# TORCH_CHECK of a bad-input test) aborted in "CHECK failed: asan_interceptors.cpp". Not in CI: ~5 min
# of CPU to compile (13 files), ~2.5 min to test on 2 cores. The crash test is left out: ASan's own
# SIGSEGV handler replaces the fault handler's dump it checks.
ASAN_BUILD := DMF_KERNELS_SANITIZE=1 DMF_KERNELS_SKIP_CUDA=1 $(PY) setup.py -q build_ext --build-lib build-asan \
              --build-temp build-asan/tmp
ASAN_CPU_ENV = LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libstdc++.so)" \
               ASAN_OPTIONS=detect_leaks=0 DMF_KERNELS_C_LIB=$$(ls $(CURDIR)/build-asan/dmf_kernels/_C*.so)
CPU_OP_TESTS := tests/kernels/test_ops.py tests/kernels/test_threads.py tests/kernels/test_adaln.py \
                tests/kernels/test_gated_residual.py tests/kernels/test_rms_norm.py tests/kernels/test_rms_adaln.py \
                tests/kernels/test_swiglu.py tests/kernels/test_rope.py tests/kernels/test_gradcheck.py \
                tests/kernels/test_bad_input.py tests/kernels/test_fsdp.py

sanitize-cpu: build
	$(ASAN_BUILD)
	$(ASAN_CPU_ENV) $(XDIST_ENV) $(PY) -m pytest $(CPU_OP_TESTS) -q -k "not four_ranks and not crashed" \
	    -p no:cacheprovider $(EMU_CAPTURE) $(XDIST)

bench: build
	$(PY) -m benchmarks.run --quick

# The dmf package on the digits set: flow model, conversion, DMF, then FD / accuracy / speed (~10 min, 2 cores).
demo: build
	$(PY) -m dmf demo --out runs/demo

# Second build path (CMake) and the machine-code gate (make inspect). Not in CI: cuda-sources (a bare
# nvcc -c of every .cu for sm_80 / sm_90a and a syntax check of the CUDA binding), which CI covers
# three times over: inspect compiles every .cu without torch headers for four archs (device code), the
# CUDA emulation compiles them with g++ (host code), and cuda-build compiles the binding for real.
ci-extra: cmake-build inspect

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

# The wheel's further archs (sm_100a, sm_120): the CUDA kernels alone (no Triton code in the wheel).
inspect: $(INSPECT_VENV)/.deps-installed
	$(INSPECT_VENV)/bin/python benchmarks/inspect_kernels.py --check --cuda-only-targets sm_100a,sm_120

# ---------------------------------------------------------------- the GPU user's install
# What a CUDA user does, on this GPU-less machine: a CUDA build of torch (2.14.1, CUDA 13.0, from
# this machine's disk; it brings triton 3.8.0) in its own venv, the extension built against it by
# setup.py with nvcc (DMF_KERNELS_FORCE_CUDA=1: a CPU-only build is an error) as a binary wheel,
# in a copy of the tree (build-cu/src: the build writes dmf_kernels/_build_config.py, and its
# ninja objects stay there between runs). make cuda-build (CI) then checks that wheel: installed
# into a fresh venv with torch and no compiler (.ci/test_wheel.sh), and the suite on torch 2.14.1
# against its _C (make test-cu). Times on 2 cores: see README_install_section.md.
CU_VENV     ?= .venv-cu
CU_PY       := $(abspath $(CU_VENV))/bin/python
CU_TORCH    := torch==2.14.1
CU_DEPS     := $(CU_TORCH) numpy pybind11 ninja pytest pytest-benchmark pytest-xdist matplotlib setuptools wheel build \
               scikit-learn tqdm $(DMF_DEPS)
WHEEL_ARCHS ?= 8.0;9.0a;10.0a;12.0
BUILD_JOBS  ?= 2
CU_SRC      := build-cu/src
# The wheel is built from the sdist, unpacked here (as `python -m build` does): what proves the sdist builds.
SDIST_SRC   := build-cu/sdist
CU_ENV      = DMF_KERNELS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$(WHEEL_ARCHS)" MAX_JOBS=$(BUILD_JOBS)
# Every file git would commit (that exists: a deletion not yet committed is still listed): the wheel
# is rebuilt when any of them changes.
TREE        := $(wildcard $(shell git ls-files -co --exclude-standard 2>/dev/null))

$(CU_VENV)/.deps-installed:
	$(PYTHON) -m venv $(CU_VENV)
	$(CU_PY) -m pip install -q --upgrade pip
	$(CU_PY) -m pip install -q $(CU_DEPS)
	$(CU_PY) -m pip install -q --no-deps torch-fidelity==0.4.0
	touch $@

# The tree's files into $(CU_SRC), modification times kept (ninja rebuilds only what changed);
# everything but its build/ (the ninja objects) is replaced, so a deleted file does not linger.
$(CU_SRC)/.copied: $(TREE)
	mkdir -p $(CU_SRC)
	find $(CU_SRC) -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
	tar -cf - $(TREE) | tar -xf - -C $(CU_SRC)
	touch $@

# The source distribution (setup.py, csrc/ with its headers, both packages; MANIFEST.in).
sdist: dist/.sdist-built

dist/.sdist-built: $(CU_VENV)/.deps-installed $(CU_SRC)/.copied
	rm -f dist/dmf_kernels-*.tar.gz
	cd $(CU_SRC) && $(CU_PY) -m build -q --sdist --no-isolation -o $(abspath dist) .
	touch $@

# The binary wheel, built from the sdist (so a file the sdist lacks fails here). The sdist unpacks into
# $(SDIST_SRC) with its files' modification times; its build/ (ninja objects) is kept, so a rerun
# recompiles only the sources that changed.
wheel: dist/.wheel-built

dist/.wheel-built: dist/.sdist-built
	rm -f dist/dmf_kernels-*.whl
	mkdir -p $(SDIST_SRC)
	find $(SDIST_SRC) -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
	tar -xzf dist/dmf_kernels-*.tar.gz -C $(SDIST_SRC) --strip-components=1
	cd $(SDIST_SRC) && /usr/bin/time -f "wheel build: %e s wall, %U s user + %S s sys CPU" env $(CU_ENV) \
	    $(CU_PY) -m pip wheel -q --no-build-isolation --no-deps -w $(abspath dist) .
	ls -l dist/dmf_kernels-*.whl
	touch $@

# The suite on torch 2.14.1 (triton 3.8.0) against the wheel's _C, unpacked into $(CU_SRC) beside
# the same Python sources (the tests run from a source tree; the installed layout is what
# .ci/test_wheel.sh checks). DMF_KERNELS_EXPECT_CUDA_ARCHS: test_build.py fails unless _C has
# CUDA kernels for exactly these archs and every raw op a CUDA kernel.
# PYTHONPATH=python: the dmf package, which an install maps from python/dmf (setup.py package_dir).
CU_TEST_ENV = DMF_KERNELS_EXPECT_CUDA_ARCHS="$(WHEEL_ARCHS)" PYTHONPATH=python \
              DMF_KERNELS_CUDA_EMU_LIB=$(abspath build-emu/release/libdmf_cuda_emu.so)
test-cu: wheel cuda-emu
	cd $(CU_SRC) && unzip -q -o $(abspath dist)/dmf_kernels-*.whl 'dmf_kernels/_C*.so' 'dmf_kernels/_build_config.py'
	cd $(CU_SRC) && $(CU_TEST_ENV) $(XDIST_ENV) $(CU_PY) -m pytest tests -q --ignore=tests/cuda_emu -p no:cacheprovider $(XDIST)
	cd $(CU_SRC) && $(CU_TEST_ENV) $(XDIST_ENV) TRITON_INTERPRET=1 $(CU_PY) -m pytest $(TRITON_TESTS) -q -p no:cacheprovider $(XDIST)

# The wheel in a fresh venv with torch 2.14.1 and no compiler on PATH: import, smoke test, and a
# build for another torch refusing to import.
test-wheel: wheel setup
	.ci/test_wheel.sh $(CU_TORCH) dist/dmf_kernels-*.whl "$(WHEEL_ARCHS)" $(abspath $(PY))

cuda-build: test-wheel test-cu

# On a CUDA machine: build with CUDA, run CUDA tests and benchmarks (benchmarks/gpu_check.sh).
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build build-emu build-cmake build-cmake.log *.egg-info dmf_kernels/_C*.so $(VENV)/.built $(INSPECT_VENV) \
	    build-cu dist build-asan
