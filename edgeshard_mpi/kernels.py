"""Decode kernels: how a loaded stage multiplies by its weights (job field runtime.kernels).

A decode step is batch-1 matrix-vector work: every weight byte is read once per token, so
the step runs at the speed the kernel streams the weights. PyTorch's fp32 `F.linear(x, W)`
with W stored [out, in] (the checkpoint's layout) streams at ~15-17 GB/s on one core here;
the same product with the weight stored transposed, [in, out] contiguous, as `x @ Wt`,
streams at ~23-29 GB/s (MKL's other gemv path). Measured on this host, 1 thread, the 58M
Llama of `make bench-speed` (per matrix and per token):

    F.linear (checkpoint layout)            9.6 ms    (lm_head 512x32000: 3.8 ms)
    x @ Wt (transposed, contiguous)         6.5 ms    (lm_head: 2.3 ms)
    MKL packed (torch.ops.mkl._mkl_linear)  7.8 ms    and 5.6x the weight's memory
    oneDNN (mkldnn_linear, mkldnn tensors)  7.8 ms
    x @ Wt through numpy's OpenBLAS         4.4 ms    (38 GB/s; the read limit is 42) <- "fast"

torch's MKL takes its generic code path on this AMD CPU; the OpenBLAS that numpy's wheels
bundle (on x86 and ARM Linux alike) has a tuned sgemv for it: batch-1 decode streams 1.5x
faster. So "fast" keeps the transposed layout and multiplies decode-sized inputs (up to
NUMPY_MAX_ROWS rows) through numpy (zero-copy views of the same storage) when numpy's BLAS
is an OpenBLAS whose thread count this process can set (pinned to one thread: see below).
A prompt's products (more rows) go through oneDNN (`torch.ops.mkldnn._linear_pointwise`,
the op torch's inductor calls, given the [out, in] view of the same storage: no second
layout), which picks its AVX-512 sgemm by the CPU's features, at the run's torch threads:
a 128-token prefill of the 232 MB model's layers takes 30 ms there against 52 ms in
numpy's OpenBLAS on its AVX2 kernels (the ones this host's OPENBLAS_CORETYPE=Haswell
picks) and 60 ms in MKL. Where torch has no oneDNN, a prompt goes to numpy at one thread
and to torch's MKL at several. The kernel of a product depends only on its shape and the
rank's thread count, so 1 and N ranks at the same threads stay bitwise identical.

Opt-in (`EDGESHARD_NATIVE=1`): at two threads or more (`runtime.threads`), decode-sized
products go to native.py's compiled product (resources/gemv.c, built once per host with the
system's C compiler), each thread streaming its slice of the output columns, and torch runs
the rest of a decode call on one thread (`native_decode`). OpenBLAS's own pool is not used:
it spins on its peers and collapsed when cores were shared (2 threads, busy host: 321 vs
64 ms/token), and its hand-off per product ate the gain (README, "Benchmarks"). The native
product's bits do not depend on its thread count (each output is one fixed chain of fused
multiply-adds). Not the default: on this 2-core host it paid in some periods only (native.py).

The transposed weights of a stage live in one buffer mapped with 2 MiB pages (where the
kernel gives transparent huge pages): on 4 KiB pages the products of a decode step
streamed ~5-9% slower (prefetchers stop at page boundaries, a TLB miss per page).

Fusing q/k/v or gate/up into one matrix streams no faster (2.89 vs 2.75 ms for the 56
layer products of the 232 MB model, fused vs not) and needs each family's forward rewritten
(or a Llama-shaped copy checked against it): a fused Llama-shaped layer measured 0.2 ms per
token less on a quiet host (fewer module calls), but lost it again under load and took the
weights out of the huge-page buffer; not kept.

The transform is family-agnostic: it walks any nn.Module and swaps each nn.Linear (the
attention and MLP projections of every decoder layer, and the lm_head) for a FastLinear
that holds the only copy of the weight, transposed. The embedding is a row gather (one
row per token), already at the memory's speed: it is left as it is, and so is a weight
shared by two modules (a head tied to the embedding as one Parameter), which would
otherwise be held twice. On CUDA the modules are left as they are (cuBLAS streams either
layout).

Under "fast" each module of a stage is also called without nn.Module's call machinery
where nothing needs it (no hooks; `_lean_class`): fewer Python steps per layer per token
(~0.035 ms per token on the 5-layer stories260K), the same forward code, the same bits.

"exact" leaves the transformers modules untouched: bitwise equal to `transformers`.
"fast" changes the order of the sums inside each dot product, so logits differ from
"exact" by rounding (reported by the tests and `make bench-speed`); 1 rank and N ranks stay
bitwise identical under either, since every rank runs the same kernel on the same layer.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import re

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _tm

from . import native

KERNELS = ("fast", "exact")


def _openblas():
    """(numpy's OpenBLAS `set_num_threads`, its core name) or (None, None) (another BLAS, or
    not found): found as threadpoolctl does, by the shared object loaded into this process."""
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if re.search(r"openblas[^/]*\.so", ln.lower())}
    except OSError:
        return None, None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for suffix in ("64_", ""):
            for pre in ("scipy_openblas_", "openblas_"):
                fn = getattr(lib, f"{pre}set_num_threads{suffix}", None)
                if fn is None:
                    continue
                fn.argtypes, fn.restype = [ctypes.c_int], None
                core = getattr(lib, f"{pre}get_corename{suffix}", None)
                if core is not None:
                    core.restype = ctypes.c_char_p
                    core = core().decode()
                return fn, core
    return None, None


np.ones((2, 2), np.float32) @ np.ones((2, 2), np.float32)  # loads numpy's BLAS now
_SET_BLAS_THREADS, BLAS_CORE = _openblas()
"""BLAS_CORE: the kernels numpy's OpenBLAS runs ("SkylakeX", "Haswell", ...; blas_core.py)."""
if _SET_BLAS_THREADS is not None:
    # Always one thread, the caller's: OpenBLAS's own thread pool spins on its peers and
    # collapsed when cores are shared (2 threads, busy host: 321 vs torch's 64 ms/token).
    _SET_BLAS_THREADS(1)
USE_NUMPY_BLAS = _SET_BLAS_THREADS is not None
NATIVE_MIN_THREADS = 2
"""Decode-sized products of a rank running this many threads or more go to native.py's
compiled product, split over its threads, where it is on (EDGESHARD_NATIVE=1) and builds."""
DECODE_THREADS = 0
"""The native product's threads inside a decode call (`native_decode`); 0: torch's count."""
NUMPY_MAX_ROWS = 16
"""Products of more rows than this (a prompt) go to oneDNN at the run's threads; decode-sized
ones stay on one-thread OpenBLAS, which streams the weights at one core's memory speed
(faster than MKL on two threads here)."""


LEAN_CALLS = True
"""Fast kernels call modules without nn.Module's call machinery where nothing needs it
(`_lean_class`); False: the ordinary calls (kept for measuring the difference)."""


class FastLinear(nn.Module):
    """y = x @ Wt (+ b) with Wt = W.T stored contiguous: the weight is held once, in the
    layout batch-1 gemv streams fastest. `.weight` is the checkpoint's [out, in]
    matrix as a view of that storage (no copy), for code that reads it."""

    def __init__(self, linear: nn.Linear, out: torch.Tensor | None = None):
        """`out`: where to put the transposed weight (a [in, out] slot of the stage's
        weight buffer, see `_weight_buffer`), else a tensor of its own."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # The transpose is copied into the new layout; the caller drops the old module, so
        # the checkpoint layout is freed and the weight is held once.
        w = linear.weight.detach().t()
        wt = w.contiguous() if out is None else out.copy_(w)
        self.weight_t = nn.Parameter(wt, requires_grad=False)
        self.bias = linear.bias
        self._lean = None  # (weight_t, its numpy view) once checked: see __call__

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`forward` without nn.Module's call machinery (~2 us of a 4-6 us call on a small
        matrix; 7 calls per layer per token): a fp32 CPU input goes straight to the same
        product `forward` makes (the same bits). Everything else (hooks, another dtype or
        device) takes the module's ordinary call."""
        lean = self._lean
        if lean is None or lean[0] is not self.weight_t:
            lean = self._lean = self._lean_view()
        if (
            lean[1] is None
            or x.dtype is not torch.float32
            or x.device.type != "cpu"
            or _hooked(self)
        ):
            return nn.Module.__call__(self, x)
        y = _product(x, lean[0], lean[1])
        return y if self.bias is None else y + self.bias

    def _lean_view(self) -> tuple:
        """(weight_t, numpy view of it) where the numpy path applies to it, else (w, None)."""
        wt = self.weight_t
        ok = USE_NUMPY_BLAS and wt.dtype == torch.float32 and wt.device.type == "cpu"
        return wt, (wt.detach().numpy() if ok else None)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wt = self.weight_t
        if USE_NUMPY_BLAS and x.dtype == wt.dtype == torch.float32 and x.is_cpu and wt.is_cpu:
            y = _product(x, wt, wt.detach().numpy())
        else:
            y = torch.matmul(x, wt)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


def _product(x: torch.Tensor, wt: torch.Tensor, wn: np.ndarray) -> torch.Tensor:
    """x @ wt (fp32, CPU; wn: numpy's view of wt). Decode-sized inputs (<= NUMPY_MAX_ROWS
    rows) through numpy's one-thread OpenBLAS, streaming the weight; a prompt's rows through
    oneDNN on the same storage (its AVX-512 sgemm, at the run's torch threads), else torch.
    The kernel depends only on the shape and the thread count: 1 and N ranks agree."""
    n = x.shape[-1]
    rows = x.numel() // n if n else 0
    if rows > NUMPY_MAX_ROWS and ONEDNN_PROMPTS and _ONEDNN:
        x2 = x.reshape(rows, n)
        y = _linear_pointwise(x2 if x2.is_contiguous() else x2.contiguous(), wt.t(), None,
                              "none", [], "")  # fmt: skip
        return y.view(*x.shape[:-1], y.shape[-1])
    if rows <= NUMPY_MAX_ROWS:
        threads = DECODE_THREADS or torch.get_num_threads()
        if threads >= NATIVE_MIN_THREADS and wt.is_contiguous():
            gemv = native.gemv()
            if gemv is not None:
                return _native_matmul(gemv, x, wt, rows, n, threads)
        return _np_matmul(x, wn)
    if torch.get_num_threads() == 1:
        return _np_matmul(x, wn)
    return torch.matmul(x, wt)


def _native_matmul(gemv, x: torch.Tensor, wt: torch.Tensor, rows: int, n: int, threads: int):
    """x @ wt through native.py's product over `threads` cores (fp32 CPU; wt contiguous)."""
    xc = x if x.is_contiguous() else x.contiguous()
    y = torch.empty((*x.shape[:-1], wt.shape[1]), dtype=torch.float32)
    gemv(xc.data_ptr(), wt.data_ptr(), y.data_ptr(), rows, n, wt.shape[1], threads)
    return y


def _np_matmul(x: torch.Tensor, wn: np.ndarray) -> torch.Tensor:
    """x @ wn through numpy's BLAS (fp32 CPU x; wn a numpy view of a weight). numpy
    allocates the result, torch takes it over without a copy (~2 us per call less than
    allocating it through torch: 7 calls per layer per token)."""
    xn = (x if x.is_contiguous() else x.contiguous()).numpy()  # BLAS-able strides
    if xn.ndim > 2 and xn.shape[0] != 1:  # one sgemm over all rows: numpy would loop the batch
        return torch.from_numpy(np.matmul(xn.reshape(-1, xn.shape[-1]), wn)).view(
            *xn.shape[:-1], -1
        )
    return torch.from_numpy(np.matmul(xn, wn))


def _onednn_linear():
    """oneDNN's fp32 linear as torch exposes it (the op inductor's CPU code calls), taking
    the weight as a [out, in] view of our [in, out] storage (no copy, no second layout);
    None where absent or where a small product disagrees with torch's beyond rounding."""
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        g = torch.Generator().manual_seed(0)
        x, wt = torch.randn(40, 24, generator=g), torch.randn(24, 8, generator=g)
        ok = torch.allclose(op(x, wt.t(), None, "none", [], ""), x @ wt, rtol=1e-4, atol=1e-5)
    except (RuntimeError, TypeError):
        return None
    return op if ok else None


_linear_pointwise = _onednn_linear()
_ONEDNN = _linear_pointwise is not None
ONEDNN_PROMPTS = True
"""Fast kernels multiply a prompt's rows through oneDNN (False: numpy's OpenBLAS at one
thread, torch's MKL at several; kept for measuring the difference)."""


def _hooked(m: nn.Module) -> bool:
    """Whether calling `m` needs nn.Module's machinery: hooks (the sequence profiler's
    timing marks), a compiled or traced call."""
    return bool(
        m._forward_hooks
        or m._forward_pre_hooks
        or m._backward_hooks
        or m._backward_pre_hooks
        or _tm._global_forward_hooks
        or _tm._global_forward_pre_hooks
        or _tm._global_backward_hooks
        or _tm._global_backward_pre_hooks
        or m._compiled_call_impl is not None
        or torch._C._get_tracing_state()
    )


_LEAN: dict[type, type] = {}


def _lean_class(cls: type) -> type:
    """`cls` with a __call__ that goes straight to the base class's forward when nothing
    needs nn.Module's call machinery (_hooked): two Python frames and a dozen attribute
    tests less per module call, ~70 module calls per token on a 5-layer model. The forward
    run is the module's own, so results are the same bits."""
    lean = _LEAN.get(cls)
    if lean is None:
        fwd = cls.forward

        def __call__(self, *args, **kwargs):
            if _hooked(self) or "forward" in self.__dict__:  # or a forward set on it
                return nn.Module.__call__(self, *args, **kwargs)
            return fwd(self, *args, **kwargs)

        # The base's forward stays the one that runs (a subclass of transformers'
        # GradientCheckpointingLayer gets its forward wrapped once more, unused here).
        lean = _LEAN[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "forward": fwd})
        lean.__module__, lean.__qualname__ = cls.__module__, cls.__qualname__
    return lean


def _make_lean(module: nn.Module) -> None:
    for m in module.modules():
        cls = type(m)
        if (
            cls not in _LEAN.values()
            and cls is not FastLinear
            and cls.__call__ is nn.Module.__call__
        ):
            m.__class__ = _lean_class(cls)


@contextlib.contextmanager
def native_decode(x: torch.Tensor):
    """One call of a "fast" CPU stage: where it is decode-sized (<= NUMPY_MAX_ROWS rows) and
    the rank runs 2+ threads, the native product takes those threads and torch runs the
    call's other operations (norms, rotary, attention: microseconds each) on one. torch's
    OpenMP workers otherwise spin after each of its parallel regions on the cores the
    product's workers use: a decode step of the 232 MB model took 8.9-9.7 ms that way
    against 4.5-4.9 ms so (and 5.7 on one thread). Prompts keep torch's threads (oneDNN)."""
    global DECODE_THREADS
    threads = torch.get_num_threads()
    rows = x.shape[0] * x.shape[1] if x.dim() >= 2 else 1
    if (
        threads < NATIVE_MIN_THREADS
        or rows > NUMPY_MAX_ROWS
        or x.device.type != "cpu"
        or DECODE_THREADS
        or native.gemv() is None
    ):
        yield
        return
    torch.set_num_threads(1)
    DECODE_THREADS = threads
    try:
        yield
    finally:
        DECODE_THREADS = 0
        torch.set_num_threads(threads)


def apply_kernels(module: nn.Module, kernels: str) -> nn.Module:
    """Give `module` (a loaded stage, any family) the kernels named; returns it."""
    if kernels not in KERNELS:
        raise ValueError(f"runtime.kernels = {kernels!r}; use one of {', '.join(KERNELS)}")
    if kernels == "exact":
        return module
    if hasattr(module, "fast_kernels"):  # a Stage: its decode calls use native_decode
        module.fast_kernels = True
    # A weight that another module also uses (a head tied to the embedding as one
    # Parameter) keeps its layout: transposing it would hold the table twice.
    uses: dict[int, int] = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            uses[p.data_ptr()] = uses.get(p.data_ptr(), 0) + 1
    swap = _to_swap(module, uses)
    slots = _weight_buffer([m.weight for m in swap]) if HUGE_PAGES else {}
    # Only ids from here on: holding the old modules would keep every [out, in] weight
    # alive until the last is swapped (twice the stage's weights at the peak); swapped
    # one by one, the old layout is freed as each new one is written.
    ids = set(map(id, swap))
    del swap
    _swap(module, ids, slots)
    if LEAN_CALLS:
        _make_lean(module)
    return module


def _to_swap(module: nn.Module, uses: dict[int, int]) -> list:
    """The nn.Linears "fast" replaces: on the CPU (cuBLAS needs no help: CUDA keeps exact),
    each weight used by that module alone."""
    return [
        m
        for m in module.modules()
        if type(m) is nn.Linear and m.weight.device.type == "cpu" and uses[m.weight.data_ptr()] == 1
    ]


def _swap(module: nn.Module, swap: set, slots: dict) -> None:
    for name, child in list(module.named_children()):
        if id(child) in swap:  # the [out, in] copy goes with child
            slot = slots.get(id(child.weight))
            setattr(module, name, FastLinear(child, slot))
            if slot is not None:
                del child
                _release_freed()
        elif not isinstance(child, FastLinear):
            _swap(child, swap, slots)


def _libc_trim():
    """glibc's malloc_trim, or None (another libc)."""
    try:
        fn = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_MALLOC_TRIM = _libc_trim()


def _release_freed() -> None:
    """Hand the heap's free pages back to the OS. A checkpoint's matrices (a few MB each)
    come from glibc's heap, and a freed one stays in the process's memory for the heap to
    reuse; the weight buffer is a mapping of its own and cannot reuse it, so without this
    a stage's load peaked at its weights twice (mini-13b, 22 layers: 1244 against 1101 MB
    for one tensor each) and an emulated device's memory limit killed it. After each old
    matrix is dropped, its pages go back: the peak is the stage's weights plus one."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


HUGE_PAGES = True
"""Fast kernels hold a stage's transposed weights in one buffer on 2 MiB pages (False:
one tensor each; kept for measuring the difference)."""

_HUGE = 2 << 20


def _weight_buffer(weights: list) -> dict:
    """One buffer for all of `weights` (by id -> a [in, out] slot of it), mapped with
    MADV_HUGEPAGE: a decode step streams every weight once, and on 4 KiB pages the
    hardware prefetcher stops at each page boundary and every page costs a TLB miss; on
    2 MiB pages the same products stream ~10% faster (measured in the README's speed
    section). Where the kernel gives no huge pages the buffer is an ordinary mapping."""
    if not weights:
        return {}
    at, offsets = 0, []
    for w in weights:
        offsets.append(at)
        at += -(-w.numel() * w.element_size() // 64) * 64  # 64-byte aligned slots
    mm = mmap.mmap(-1, at + _HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # no transparent huge pages: ordinary pages
            mm.madvise(mmap.MADV_HUGEPAGE)
    buf = torch.frombuffer(mm, dtype=torch.uint8)  # keeps `mm` alive
    base = -buf.data_ptr() % _HUGE  # the first 2 MiB boundary: whole huge pages
    slots = {}
    for w, off in zip(weights, offsets, strict=True):
        n = w.numel() * w.element_size()
        a = base + off
        slots[id(w)] = buf[a : a + n].view(w.dtype).view(w.shape[1], w.shape[0])
    return slots


def load_stage(spec, start: int, end: int, dtype: str, device, source, kernels: str = "fast"):
    """Build and load units [start, end) and give them the run's kernels: the one place a
    runner or profiler makes a stage, so profiles time the kernels the run uses."""
    from .model import Stage

    stage = Stage(spec, start, end, dtype, device)
    stage.load(source)
    return apply_kernels(stage, kernels)
