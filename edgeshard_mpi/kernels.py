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
bundle (on x86 and ARM Linux alike) has a tuned sgemv and sgemm for it: batch-1 decode
streams 1.5x faster and prefill's sgemm is ~20% faster. So "fast" keeps the transposed
layout and multiplies through numpy (zero-copy views of the same storage) when numpy's
BLAS is an OpenBLAS whose thread count this process can set (pinned to one thread: see
below); otherwise through torch. With several torch threads a prompt's products (more
than NUMPY_MAX_ROWS rows) use torch's multi-threaded MKL. The kernel of a product depends
only on its shape and the rank's thread count, so 1 and N ranks at the same threads stay
bitwise identical. Fusing q/k/v or gate/up into one matrix streams no faster (23.7 vs
23.4 GB/s) and would mean rewriting each family's attention, so it is not done.

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

import ctypes
import re

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _tm

KERNELS = ("fast", "exact")


def _openblas_setter():
    """numpy's OpenBLAS `set_num_threads`, or None (another BLAS, or not found): found as
    threadpoolctl does, by the shared object loaded into this process."""
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if re.search(r"openblas[^/]*\.so", ln.lower())}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in (
            "scipy_openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_",
            "openblas_set_num_threads",
        ):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_int], None
                return fn
    return None


np.ones((2, 2), np.float32) @ np.ones((2, 2), np.float32)  # loads numpy's BLAS now
_SET_BLAS_THREADS = _openblas_setter()
if _SET_BLAS_THREADS is not None:
    # Always one thread, the caller's: OpenBLAS's own thread pool spins on its peers and
    # collapsed when cores are shared (2 threads, busy host: 321 vs torch's 64 ms/token).
    _SET_BLAS_THREADS(1)
USE_NUMPY_BLAS = _SET_BLAS_THREADS is not None
NUMPY_MAX_ROWS = 16
"""With several torch threads, products of more rows than this (a prompt) go to torch's
multi-threaded MKL; decode-sized ones stay on one-thread OpenBLAS, which streams the
weights at one core's memory speed (faster than MKL on two threads here)."""


LEAN_CALLS = True
"""Fast kernels call modules without nn.Module's call machinery where nothing needs it
(`_lean_class`); False: the ordinary calls (kept for measuring the difference)."""


class FastLinear(nn.Module):
    """y = x @ Wt (+ b) with Wt = W.T stored contiguous: the weight is held once, in the
    layout MKL's batch-1 gemv streams fastest. `.weight` is the checkpoint's [out, in]
    matrix as a view of that storage (no copy), for code that reads it."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # .contiguous() on the transpose makes the new layout; the caller drops the old
        # module, so the checkpoint layout is freed and the weight is held once.
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias
        self._lean = None  # (weight_t, its numpy view) once checked: see __call__

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The decode path without nn.Module's call machinery (~2 us of a 4-6 us call on
        a small matrix; 7 calls per layer per token): a contiguous fp32 CPU input goes
        straight to the same numpy product `forward` makes (the same bits). Everything
        else (hooks, another dtype or device, several torch threads) takes the module's
        ordinary call."""
        lean = self._lean
        if lean is None or lean[0] is not self.weight_t:
            lean = self._lean = self._lean_view()
        if (
            lean[1] is None
            or x.dtype is not torch.float32
            or x.device.type != "cpu"
            or _hooked(self)
            or (x.numel() > NUMPY_MAX_ROWS * self.in_features and torch.get_num_threads() != 1)
        ):
            return nn.Module.__call__(self, x)
        xn = (x if x.is_contiguous() else x.contiguous()).numpy()
        if xn.ndim > 2 and xn.shape[0] != 1:  # as in forward: one sgemm over all rows
            y = torch.from_numpy(np.matmul(xn.reshape(-1, xn.shape[-1]), lean[1]))
            y = y.view(*xn.shape[:-1], -1)
        else:
            y = torch.from_numpy(np.matmul(xn, lean[1]))
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
        if (
            USE_NUMPY_BLAS
            and x.dtype == wt.dtype == torch.float32
            and x.is_cpu
            and wt.is_cpu
            and (x.numel() <= NUMPY_MAX_ROWS * self.in_features or torch.get_num_threads() == 1)
        ):
            # numpy's OpenBLAS (module docstring) on views of the same storage; numpy
            # allocates the result, torch takes it over without a copy (~2 us per call less
            # than allocating it through torch: 7 calls per layer per token).
            xn = (x if x.is_contiguous() else x.contiguous()).numpy()  # BLAS-able strides
            if xn.ndim > 2 and xn.shape[0] != 1:  # one sgemm over all rows: numpy would
                rows = np.matmul(xn.reshape(-1, xn.shape[-1]), wt.numpy())  # loop the batch
                y = torch.from_numpy(rows.reshape(*xn.shape[:-1], -1))
            else:
                y = torch.from_numpy(np.matmul(xn, wt.numpy()))
        else:
            y = torch.matmul(x, wt)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


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


def apply_kernels(module: nn.Module, kernels: str) -> nn.Module:
    """Give `module` (a loaded stage, any family) the kernels named; returns it."""
    if kernels not in KERNELS:
        raise ValueError(f"runtime.kernels = {kernels!r}; use one of {', '.join(KERNELS)}")
    if kernels == "exact":
        return module
    # A weight that another module also uses (a head tied to the embedding as one
    # Parameter) keeps its layout: transposing it would hold the table twice.
    uses: dict[int, int] = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            uses[p.data_ptr()] = uses.get(p.data_ptr(), 0) + 1
    _swap(module, uses)
    if LEAN_CALLS:
        _make_lean(module)
    return module


def _swap(module: nn.Module, uses: dict[int, int]) -> None:
    for name, child in list(module.named_children()):
        if (
            type(child) is nn.Linear
            and child.weight.device.type == "cpu"  # cuBLAS needs no help: CUDA keeps exact
            and uses[child.weight.data_ptr()] == 1
        ):
            setattr(module, name, FastLinear(child))  # the [out, in] copy goes with child
        elif not isinstance(child, FastLinear):
            _swap(child, uses)


def load_stage(spec, start: int, end: int, dtype: str, device, source, kernels: str = "fast"):
    """Build and load units [start, end) and give them the run's kernels: the one place a
    runner or profiler makes a stage, so profiles time the kernels the run uses."""
    from .model import Stage

    stage = Stage(spec, start, end, dtype, device)
    stage.load(source)
    return apply_kernels(stage, kernels)
