"""A small C CSR kernel (fp32 or bf16 weights, int16 or int32 column indices), compiled on first use with the system C compiler.

Why: on one CPU core the generic kernels leave speed on the table for decode. SciPy's matrix-matrix loop
is scalar, and MKL (behind ``torch_csr``) is tuned for larger right-hand sides. This kernel transposes
the few input rows once so that each stored weight multiplies a contiguous run of ``tokens`` inputs,
which the compiler vectorises (``omp simd``), and does the batch-1 dot products with a vectorised
reduction. Measured per layer like every kernel: it is used only where it wins.

The library is built with ``cc -O3 -march=native`` into ``$HF_ELSA_CACHE/kernels/<hash>/`` (the hash
covers the source, the flags, the compiler and this CPU's feature flags, so a shared cache never hands a
binary to a CPU it was not built for). No compiler, a failed build or ``HF_ELSA_NATIVE=0`` makes the
kernel unavailable; the others still run.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .kernels import Kernel, register_kernel

logger = logging.getLogger(__name__)

SOURCE = r"""
#include <stdint.h>
/* y (n, out) = x (n, in) @ W^T with W in CSR: rowptr (out + 1), col (nnz), val (nnz); xt: (in, n) scratch.
   x, xt and y are fp32; the stored values are fp32 or bf16 (LOADV widens them: a bf16 is the top half of an
   fp32). Four copies: int16 column indices (in_features <= 32768) or int32, times fp32 or bf16 values. */
static inline float hf_elsa_bf16(uint16_t h) {
  union { uint32_t u; float f; } c;
  c.u = (uint32_t)h << 16;
  return c.f;
}
#define ROWS(W)                                                                       \
  for (int64_t r = 0; r < out; r++) {                                                 \
    float acc[W];                                                                     \
    for (int q = 0; q < W; q++) acc[q] = 0.f;                                         \
    const int32_t s = rowptr[r], e = rowptr[r + 1];                                   \
    for (int32_t k = s; k < e; k++) {                                                 \
      const float v = LOADV(k);                                                       \
      const float *xr = xt + (int64_t)col[k] * n + c0;                                \
      _Pragma("omp simd") for (int q = 0; q < W; q++) acc[q] += v * xr[q];            \
    }                                                                                 \
    for (int q = 0; q < W; q++) y[(c0 + q) * out + r] = acc[q];                       \
  }
#define KERNELS(SUFFIX, IDX, VT)                                                                      \
void hf_elsa_csr_mv_##SUFFIX(int64_t out, const int32_t *rowptr, const IDX *col, const VT *val,       \
                             const float *x, float *y) {                                              \
  for (int64_t r = 0; r < out; r++) {                                                                 \
    float acc = 0.f;                                                                                  \
    const int32_t s = rowptr[r], e = rowptr[r + 1];                                                   \
    _Pragma("omp simd reduction(+:acc)")                                                              \
    for (int32_t k = s; k < e; k++) acc += LOADV(k) * x[col[k]];                                      \
    y[r] = acc;                                                                                       \
  }                                                                                                   \
}                                                                                                     \
void hf_elsa_csr_mm_##SUFFIX(int64_t n, int64_t in, int64_t out, const int32_t *rowptr,               \
                             const IDX *col, const VT *val, const float *x, float *xt, float *y) {    \
  for (int64_t i = 0; i < n; i++)                                                                     \
    for (int64_t j = 0; j < in; j++) xt[j * n + i] = x[i * in + j];                                   \
  int64_t c0 = 0;                                                                                     \
  for (; c0 + 16 <= n; c0 += 16) { ROWS(16) }                                                         \
  for (; c0 + 8 <= n; c0 += 8) { ROWS(8) }                                                            \
  for (; c0 + 4 <= n; c0 += 4) { ROWS(4) }                                                            \
  for (; c0 < n; c0 += 1) { ROWS(1) }                                                                 \
}
#define LOADV(k) val[k]
KERNELS(i16, uint16_t, float)
KERNELS(i32, int32_t, float)
#undef LOADV
#define LOADV(k) hf_elsa_bf16(val[k])
KERNELS(bf16_i16, uint16_t, uint16_t)
KERNELS(bf16_i32, int32_t, uint16_t)
"""
FLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fPIC", "-shared"]
_LIB: ctypes.CDLL | None = None
_ERROR: str | None = None


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cache_root() -> Path:
    root = os.environ.get("HF_ELSA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hf_elsa"))
    return Path(root) / "kernels"


def load_library() -> ctypes.CDLL | None:
    """The compiled kernel library, building it once; None (reason in :func:`unavailable_reason`) if not."""
    global _LIB, _ERROR
    if _LIB is not None or _ERROR is not None:
        return _LIB
    if os.environ.get("HF_ELSA_NATIVE", "1") == "0":
        _ERROR = "disabled by HF_ELSA_NATIVE=0"
        return None
    if platform.system() not in ("Linux", "Darwin"):
        _ERROR = f"not built on {platform.system()}"
        return None
    cc = _compiler()
    if cc is None:
        _ERROR = "no C compiler (cc, gcc or clang) on PATH"
        return None
    try:
        version = subprocess.run([cc, "--version"], check=False, capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE, " ".join(FLAGS), cc, version, _cpu_id()]).encode()).hexdigest()[:16]
        target = _cache_root() / key / "libhf_elsa_csr.so"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src = Path(tmp) / "csr.c"
                src.write_text(SOURCE)
                out = Path(tmp) / target.name
                done = subprocess.run(
                    [cc, *FLAGS, str(src), "-o", str(out)], check=False, capture_output=True, text=True, timeout=120
                )
                if done.returncode != 0:
                    raise RuntimeError(done.stderr.strip()[-500:])
                os.replace(out, target)  # atomic: concurrent builders agree on the result
        lib = ctypes.CDLL(str(target))
    except Exception as exc:  # noqa: BLE001 - any failure only disables this kernel
        _ERROR = f"build failed: {exc}"
        logger.info("hf_elsa native CSR kernel unavailable: %s", _ERROR)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for suffix in ("i16", "i32", "bf16_i16", "bf16_i32"):
        getattr(lib, f"hf_elsa_csr_mv_{suffix}").argtypes = [i64, ptr, ptr, ptr, ptr, ptr]
        getattr(lib, f"hf_elsa_csr_mv_{suffix}").restype = None
        getattr(lib, f"hf_elsa_csr_mm_{suffix}").argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr]
        getattr(lib, f"hf_elsa_csr_mm_{suffix}").restype = None
    _LIB = lib
    return lib


def unavailable_reason() -> str | None:
    load_library()
    return _ERROR


@register_kernel
class NativeCsrKernel(Kernel):
    name = "native_csr"
    description = (
        "hf_elsa's C CSR kernel (fp32 or bf16 weights, fp32 sums, int16/int32 indices, vectorised over tokens)"
    )

    @classmethod
    def available(cls, dtype, device):
        if device.type != "cpu":
            return False, "CPU only"
        if dtype not in (torch.float32, torch.bfloat16):
            return False, f"fp32 or bf16 only, the weight is {dtype}"
        if load_library() is None:
            return False, _ERROR or "unavailable"
        return True, ""

    def bind(self, module) -> None:
        # the C code reads the value bytes as fp32 or bf16: any other dtype would be read as garbage (NaN logits)
        ok, why = self.available(module.values.dtype, module.values.device)
        if not ok:
            raise ValueError(f"native_csr cannot serve this layer: {why}")
        lib = load_library()
        suffix = {torch.int16: "i16", torch.int32: "i32"}[module.col_indices.dtype]
        if module.values.dtype == torch.bfloat16:
            suffix = "bf16_" + suffix
        self.mv, self.mm = getattr(lib, f"hf_elsa_csr_mv_{suffix}"), getattr(lib, f"hf_elsa_csr_mm_{suffix}")
        self.ptrs = (module.crow_indices.data_ptr(), module.col_indices.data_ptr(), module.values.data_ptr())
        self.module_buffers = (module.crow_indices, module.col_indices, module.values)  # keep them alive

    def __call__(self, module, x):
        bound = self.module_buffers
        if bound[0] is not module.crow_indices or bound[1] is not module.col_indices or bound[2] is not module.values:
            self.bind(module)  # buffers replaced behind the module's back (not through .to()): raw pointers are stale
        # SparseLinear hands over x in the weight's dtype (fp32 or bf16); the kernel reads and sums in fp32
        dtype = x.dtype
        x = x.float().contiguous()
        n, out = x.shape[0], module.out_features
        y = torch.empty(n, out, dtype=torch.float32)
        rowptr, col, val = self.ptrs
        if n == 1:
            self.mv(out, rowptr, col, val, x.data_ptr(), y.data_ptr())
        else:
            xt = torch.empty(module.in_features, n, dtype=torch.float32)
            self.mm(n, module.in_features, out, rowptr, col, val, x.data_ptr(), xt.data_ptr(), y.data_ptr())
        return y.to(dtype)
