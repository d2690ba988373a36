"""Run the CuPy backend's CUDA kernels on the CPU, so CI checks them without a GPU.

How: the CUDA source is compiled by g++ behind a small shim.  Each CUDA thread
of a block is a ``ucontext`` fiber; a warp shuffle (``__shfl_xor_sync``) and
``__syncwarp`` are barriers at which every fiber yields to a round-robin
scheduler, so each fiber reads its partner's value after all have written
theirs.  Each round runs the fibers in an order of its own (a rotation of
thread order, forwards or backwards), so a read of another lane's write that no
barrier orders comes out stale in some round (on a GPU it is a race).  Every
fiber passes one barrier per round, so the 32 fibers of a warp stay in step as
long as they reach the same barriers; warps may branch apart
(a branch that is uniform over each warp is legal CUDA), but the threads of a
warp must reach the same barriers: a warp whose threads finish in different
rounds (a barrier some of them never reached, undefined on a GPU) is reported
as an error.  Blocks run one after another.  The kernels' arguments are checked
as they are passed: every ``T*`` must be a device array of the kernel's element
type, every ``double*`` a float64 one (a strided view passes the address of its
first element, as CuPy does).  ``__syncthreads`` holds each fiber that reaches
it until every fiber of the block has; a block whose threads end while others
wait there is reported as an error.  ``__shared__`` arrays are statics, one
per kernel instantiation, filled with NaN bytes before each block runs (a GPU
leaves them undefined at a block's start; the first block of an instantiation's
first launch finds them filled as its first thread declares them), with
SHARED_CANARY entries past their declared end that a block must leave as they
were (a write past the end is reported).  ``__shared__`` arrays keep their ``__align__``, and
the 16-byte vector accesses of ``_cupy_device.cuh`` (``load4``, ``store4``) are
checked for alignment, which a GPU would fault on.  A launch's array arguments
are copies between guard pages (``guarded_args.py``): a write just outside them
is reported, a read just outside gives NaN, and one further faults, where a GPU
would fault or touch another allocation.  Blocks run one after another, so a
launch of several runs twice, on two copies of its arrays, its blocks in order
and then in reverse; where the two copies differ the result depends on the
blocks' order, which a GPU does not keep (a block reading what another writes,
or two writing one place), and the launch is reported.

A launch takes the device arrays of ``fake_cupy.py``'s NumPy-backed ``cupy``,
whose ``RawModule`` compiles through this emulator, so the backend's own Python
code (chunking, the cuBLAS-shaped products, strides, launch shapes) runs end to
end; a NumPy array passed to a kernel raises, as CuPy's launch does.  What it
cannot check: timing, and the GPU's own float rounding (the CPU's libm stands
in for CUDA's).
"""

import ctypes
import hashlib
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tests.kernels.fake_cupy import FakeCupyArray, issue
from tests.kernels.guarded_args import GuardedArgs

CXX = shutil.which("g++")
AVAILABLE = CXX is not None and sys.platform.startswith("linux")

_SHIM = r"""
#include <ucontext.h>
#include <cmath>
#include <cstring>
#include <vector>

struct emu_dim3 { unsigned x, y, z; };
static emu_dim3 blockIdx = {0u, 0u, 0u};
static emu_dim3 blockDim = {1u, 1u, 1u};
static emu_dim3 gridDim = {1u, 1u, 1u};
static int emu_tid = 0;
#define threadIdx (emu_dim3{(unsigned)emu_tid, 0u, 0u})
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#include <cstdint>
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
static inline double2 make_double2(double x, double y) { return {x, y}; }
static int emu_misaligned = 0;  // a vector access off its 16-byte boundary (a GPU faults)
// every __shared__ array seen so far (its storage, its bytes with the canary past
// its declared end), refilled with NaN bytes before each block runs
struct emu_shared_array { unsigned char* p; size_t bytes, declared; };
static std::vector<emu_shared_array> emu_shared;
static inline void emu_register_shared(void* p, size_t bytes, size_t declared) {
    for (const auto& s : emu_shared) if (s.p == p) return;
    // first seen by the block's first thread to run, before any thread wrote to it
    std::memset(p, 0xff, bytes);
    emu_shared.push_back({(unsigned char*)p, bytes, declared});
}
// 1 where a block wrote into a canary: past the end of a __shared__ array
static int emu_canary_written() {
    for (const auto& s : emu_shared)
        for (size_t b = s.declared; b < s.bytes; ++b)
            if (s.p[b] != 0xff) return 1;
    return 0;
}
#define FASTLVM_CHECK_ALIGNED(p) \
    do { if ((std::uintptr_t)(p) % 16u) emu_misaligned = 1; } while (0)

static ucontext_t emu_scheduler;
static std::vector<ucontext_t> emu_fibers;
static std::vector<char> emu_done;
static std::vector<char> emu_at_sync;  // waiting at __syncthreads
static std::vector<std::vector<char>> emu_stacks;
static std::vector<double> emu_exchange;
static void (*emu_body)(void*) = nullptr;
static void* emu_args = nullptr;

static inline void emu_barrier() { swapcontext(&emu_fibers[emu_tid], &emu_scheduler); }
static inline void __syncwarp(unsigned = 0xffffffffu) { emu_barrier(); }
static inline void __syncthreads() { emu_at_sync[emu_tid] = 1; emu_barrier(); }

static inline float __int_as_float(unsigned int i) {
    float f; std::memcpy(&f, &i, sizeof f); return f;
}
static inline double __longlong_as_double(long long i) {
    double f; std::memcpy(&f, &i, sizeof f); return f;
}
static inline float __uint_as_float(unsigned int i) {
    float f; std::memcpy(&f, &i, sizeof f); return f;
}
static inline unsigned int __float_as_uint(float f) {
    unsigned int i; std::memcpy(&i, &f, sizeof i); return i;
}
// g++ here contracts no multiply-add (-std=c++17: -ffp-contract=off)
static inline double __dmul_rn(double a, double b) { return a * b; }
template <typename T> static inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    const int t = emu_tid;
    emu_exchange[t] = (double)v;  // exact for float and double
    emu_barrier();
    const T r = (T)emu_exchange[t ^ lane_mask];
    emu_barrier();
    return r;
}

static void emu_entry() { emu_body(emu_args); emu_done[emu_tid] = 1; }

// Runs one block; 0 on success, 1 when the threads of a warp reached different
// barriers (they finished in different rounds), 2 when some threads ended while
// others waited at __syncthreads.
static int emu_run_block(int threads) {
    if ((int)emu_fibers.size() < threads) {
        emu_fibers.resize(threads);
        emu_done.resize(threads);
        emu_at_sync.resize(threads);
        emu_stacks.resize(threads);
        emu_exchange.resize(threads);
    }
    for (const auto& s : emu_shared) std::memset(s.p, 0xff, s.bytes);
    for (int t = 0; t < threads; ++t) {
        emu_stacks[t].resize(1 << 16);
        getcontext(&emu_fibers[t]);
        emu_fibers[t].uc_stack.ss_sp = emu_stacks[t].data();
        emu_fibers[t].uc_stack.ss_size = emu_stacks[t].size();
        emu_fibers[t].uc_link = &emu_scheduler;
        makecontext(&emu_fibers[t], emu_entry, 0);
        emu_done[t] = 0;
        emu_at_sync[t] = 0;
    }
    for (unsigned round = 0;; ++round) {
        // each round runs the fibers in an order of its own (a rotation, forwards or
        // backwards, from a hash of the round), so a lane that reads another's write
        // with no barrier between them reads it stale in some round
        unsigned h = round * 2654435761u;
        h ^= h >> 15;
        const bool backwards = h & 1u;
        const int start = (int)((h >> 1) % (unsigned)threads);
        for (int i = 0; i < threads; ++i) {
            const int t = backwards ? (start - i + threads) % threads : (start + i) % threads;
            if (!emu_done[t] && !emu_at_sync[t]) {
                emu_tid = t;
                swapcontext(&emu_scheduler, &emu_fibers[t]);
            }
        }
        int finished = 0, waiting = 0;
        for (int t = 0; t < threads; ++t) waiting += emu_at_sync[t];
        for (int w = 0; w < threads; w += 32) {
            const int end = w + 32 < threads ? w + 32 : threads;
            int in_warp = 0;
            for (int t = w; t < end; ++t) in_warp += emu_done[t];
            if (in_warp != 0 && in_warp != end - w) return 1;
            finished += in_warp;
        }
        if (finished == threads) return emu_canary_written() ? 4 : 0;
        if (waiting == threads - finished) {  // every live thread is at __syncthreads
            if (finished) return 2;
            for (int t = 0; t < threads; ++t) emu_at_sync[t] = 0;
        }
    }
}
"""

_KERNEL = re.compile(r"template\s*<\s*typename\s+T\s*>\s*__global__\s+void\s+"
                     r"(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(([^)]*)\)")


def _param_kind(decl):
    """'p' (a T* pointer), 'd' (a double* pointer), 'q' (long long), 'i' (int) or
    'f' (double) for one parameter declaration."""
    decl = " ".join(decl.split())
    if "*" in decl:
        return "d" if "double" in decl else "p"
    if decl.startswith("long long"):
        return "q"
    if decl.startswith("int"):
        return "i"
    if decl.startswith("double"):
        return "f"
    raise ValueError(f"the emulator has no rule for the kernel parameter {decl!r}")


def kernel_signatures(source):
    """{kernel name: parameter kinds} of the ``template <typename T> __global__``
    kernels in a CUDA source."""
    return {name: [_param_kind(p) for p in params.split(",")]
            for name, params in _KERNEL.findall(source)}


_C_TYPES = {"p": "void*", "d": "void*", "q": "long long", "i": "int", "f": "double"}
_CTYPES = {"p": ctypes.c_void_p, "d": ctypes.c_void_p, "q": ctypes.c_longlong,
           "i": ctypes.c_int, "f": ctypes.c_double}
_ELEMENT = {"float": np.dtype(np.float32), "double": np.dtype(np.float64)}


def _wrappers(signatures):
    out = []
    for name, kinds in signatures.items():
        for t in _ELEMENT:
            tag = f"{name}_{t}"
            fields = "".join(f" {_C_TYPES[k]} a{i};" for i, k in enumerate(kinds))
            cast = {"p": f"({t}*)", "d": "(double*)"}
            call = ", ".join(f"{cast.get(k, '')}a->a{i}" for i, k in enumerate(kinds))
            params = ", ".join(f"{_C_TYPES[k]} a{i}" for i, k in enumerate(kinds))
            names = ", ".join(f"a{i}" for i in range(len(kinds)))
            out.append(f"""
struct args_{tag} {{{fields} }};
static void body_{tag}(void* p) {{ args_{tag}* a = (args_{tag}*)p; {name}<{t}>({call}); }}
extern "C" int emu_{tag}(long long grid, long long block, long long reversed, {params}) {{
    args_{tag} a = {{{names}}};
    emu_body = body_{tag}; emu_args = &a;
    blockDim.x = (unsigned)block; gridDim.x = (unsigned)grid;
    emu_misaligned = 0;
    for (long long i = 0; i < grid; ++i) {{
        const long long b = reversed ? grid - 1 - i : i;
        blockIdx.x = (unsigned)b;
        const int status = emu_run_block((int)block);
        if (status) return status;
        if (emu_misaligned) return 3;
    }}
    return 0;
}}""")
    return "\n".join(out)


_SHARED = re.compile(r"__shared__([^;{}]*?)(\w+)(\[[^;]*\]);")


SHARED_CANARY = 1024  # entries past the declared end of each __shared__ array


def _registered_shared(source):
    """The source with each ``__shared__`` array declared SHARED_CANARY entries
    longer and registered: the emulator fills it with NaN bytes before every block,
    as a GPU leaves shared memory undefined at a block's start, so a read of an
    entry the block has not written (or one past the end) shows in its results, and
    reports a block that wrote past the declared end."""
    def declare(m):
        qualifiers, name, size = m.group(1), m.group(2), m.group(3)[1:-1]
        return (f"static{qualifiers}{name}[({size}) + {SHARED_CANARY}]; "
                f"emu_register_shared({name}, sizeof({name}), "
                f"sizeof({name}) - {SHARED_CANARY} * sizeof({name}[0]));")

    return _SHARED.sub(declare, source)


_LIBRARIES = {}  # source hash -> (ctypes library, signatures)


def build(source):
    """Compile a CUDA source for the emulator (cached per source text)."""
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    if key not in _LIBRARIES:
        signatures = kernel_signatures(source)
        workdir = Path(tempfile.mkdtemp(prefix="fastlvm-cuda-emulator-"))
        cpp = workdir / "kernels.cpp"
        cpp.write_text(_SHIM + "\n" + _registered_shared(source) + "\n"
                       + _wrappers(signatures))
        lib = workdir / "kernels.so"
        subprocess.run([CXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-w", str(cpp),
                        "-o", str(lib)], check=True, capture_output=True, text=True)
        _LIBRARIES[key] = (ctypes.CDLL(str(lib)), signatures)
    return _LIBRARIES[key]


class EmulatedKernel:
    """A kernel instantiation called as CuPy calls a RawKernel:
    ``kernel(grid, block, args)`` (1-D grids and blocks)."""

    def __init__(self, library, signatures, expression):
        match = re.fullmatch(r"(\w+)<(float|double)>", expression)
        if match is None:
            raise ValueError(f"not a kernel instantiation: {expression!r}")
        name, ctype = match.groups()
        self.name, self.kinds, self.dtype = expression, signatures[name], _ELEMENT[ctype]
        self.fn = getattr(library, f"emu_{name}_{ctype}")
        self.fn.argtypes = [ctypes.c_longlong] * 3 + [
            _CTYPES[k] for k in self.kinds]
        self.fn.restype = ctypes.c_int

    def __call__(self, grid, block, args):
        """Launch now; in a stream's capture, also kept for the graph's replays."""
        issue(lambda: self._launch(grid, block, args))

    def _launch(self, grid, block, args):
        grid, block = tuple(grid), tuple(block)
        if len(grid) != 1 or len(block) != 1:
            raise ValueError(f"{self.name}: the emulator runs 1-D launches only")
        if len(args) != len(self.kinds):
            raise TypeError(f"{self.name} takes {len(self.kinds)} arguments, got {len(args)}")
        values, arrays = [], []
        for i, (kind, a) in enumerate(zip(self.kinds, args)):
            if kind in ("p", "d"):
                want = self.dtype if kind == "p" else np.dtype(np.float64)
                if isinstance(a, np.ndarray):
                    raise TypeError(f"{self.name} argument {i}: a NumPy array; CuPy "
                                    f"launches take device arrays (cupy.asarray)")
                a = a._array if isinstance(a, FakeCupyArray) else a
                if not isinstance(a, np.ndarray) or a.dtype != want:
                    raise TypeError(f"{self.name} argument {i}: expected a {want} "
                                    f"array, got {getattr(a, 'dtype', type(a))}")
                arrays.append((i, a))
                values.append(None)  # its guarded copy's address, below
            elif kind == "f":
                if not isinstance(a, (float, np.floating)):
                    raise TypeError(f"{self.name} argument {i}: expected a float, got "
                                    f"{type(a).__name__}")
                values.append(float(a))
            else:
                if not isinstance(a, (np.integer, int)):
                    raise TypeError(f"{self.name} argument {i}: expected an integer, got "
                                    f"{type(a).__name__}")
                values.append(int(a))
        # the arrays staged between guard pages (guarded_args.py): a read or write
        # outside them faults or is reported, as on a GPU.  A launch of several
        # blocks runs twice, on two staged copies, its blocks in order and then in
        # reverse: a GPU runs them in no set order, so results that differ
        # depend on it (one block reading or overwriting what another wrote)
        runs = []
        try:
            for reversed_ in ((0, 1) if int(grid[0]) > 1 else (0,)):
                runs.append(GuardedArgs([(f"{i}", a) for i, a in arrays]))
                for i, a in arrays:
                    values[i] = runs[-1].address(a)
                status = self.fn(int(grid[0]), int(block[0]), reversed_, *values)
                if status:
                    raise RuntimeError(f"{self.name}: {_FAILURES[status]}")
            if len(runs) == 2:
                runs[0].require_same_bytes(runs[1], self.name)
        except BaseException:
            for run in runs:
                run.discard()
            raise
        for run in runs[1:]:
            run.discard()
        runs[0].finish(self.name)


# what a block did wrong, by the status emu_<kernel> returns
_FAILURES = {
    1: "the threads of a block reached different barriers (undefined on a GPU)",
    2: "some threads of a block ended while others waited at __syncthreads (undefined "
       "on a GPU)",
    3: "a vector access (load4 / store4) off its 16-byte boundary (a misaligned-address "
       "fault on a GPU)",
    4: "a block wrote past the end of a __shared__ array (another block's memory, or a "
       "fault, on a GPU)",
}


class EmulatedRawModule:
    """``cupy.RawModule`` for the emulator: ``get_function('name<float>')``."""

    def __init__(self, code, options=(), name_expressions=()):
        self.library, self.signatures = build(code)
        self.name_expressions = tuple(name_expressions)

    def get_function(self, expression):
        if self.name_expressions and expression not in self.name_expressions:
            raise KeyError(f"{expression} was not among the module's name_expressions")
        return EmulatedKernel(self.library, self.signatures, expression)
