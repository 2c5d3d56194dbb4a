"""The native kernels of the surgery rules (``_native.c``): build, load, dispatch.

On first use the C source is compiled with the system C compiler (``$CC``, else ``cc``)
into a shared library cached under ``$DOMAINGRAD_CACHE_DIR`` (default
``$XDG_CACHE_HOME/domaingrad``, else ``~/.cache/domaingrad``), keyed by the source, the
compiler, its flags and the CPU's features, and loaded with ctypes; this takes about a
second once per machine. Where no compiler is found or the build fails, :func:`library`
returns ``None`` (with one ``RuntimeWarning`` saying why) and the rules use torch
operations: same results (see :mod:`._noise`), slower. ``DOMAINGRAD_NATIVE=0`` turns
the kernels off.

The kernels run on CPU tensors of float32 or float64 whose domain rows are contiguous.
Work is cut into ranges of :data:`RANGE` components, fixed whatever the thread count,
and run on ``torch.get_num_threads()`` threads (ctypes releases the GIL during a call);
every partial result is kept per range and summed in range order, so results do not
depend on the number of threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from ._noise import ZIGGURAT_F, ZIGGURAT_T, ZIGGURAT_W, ZIGGURAT_X

#: components per range of work (a thread's unit; fixed, so results are thread-independent)
RANGE = 1 << 18
#: the most domains the native Gram and combination kernels take (more: torch operations)
GRAM_MAX_DOMAINS = 32
_SOURCE = Path(__file__).with_name("_native.c")
_FLAGS = ("-O3", "-std=c99", "-ffp-contract=off", "-fPIC", "-shared")
_ARCH_FLAGS = ("-march=native",)

_lock = threading.Lock()
_state: dict[str, Any] = {}
_T = TypeVar("_T")


def _cache_dir() -> Path:
    if os.environ.get("DOMAINGRAD_CACHE_DIR"):
        return Path(os.environ["DOMAINGRAD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "domaingrad"


def _cpu_features() -> str:
    """The CPU's feature list (the library is built for this CPU with -march=native)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, flags: Sequence[str], target: Path) -> None:
    """Compile the source into ``target`` atomically (a temporary file, then a rename),
    so that processes building at the same time never load a partial library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *flags, "-o", tmp, str(_SOURCE), "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-400:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler: {compiler!r} is not on PATH (install gcc or clang, or set CC)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    last_error: Exception | None = None
    for flags in ((*_FLAGS, *_ARCH_FLAGS), _FLAGS):  # without -march=native if that fails
        key = hashlib.sha256(
            "\0".join(
                [_SOURCE.read_text(), compiler, version, " ".join(flags), platform.machine(), _cpu_features()]
            ).encode()
        ).hexdigest()[:20]
        target = _cache_dir() / f"surgery-{key}.so"
        try:
            if not target.exists():
                _build(compiler, flags, target)
            try:
                lib = ctypes.CDLL(str(target))
            except OSError:  # a damaged cached file: build it again, once
                _build(compiler, flags, target)
                lib = ctypes.CDLL(str(target))
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            last_error = err
            continue
        _declare(lib)
        return lib
    raise RuntimeError(f"building the native kernels failed: {last_error}")


def _declare(lib: ctypes.CDLL) -> None:
    i64, u64, ptr, dbl = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_double
    for name in ("dg_agree_f32", "dg_agree_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [ptr, i64, i64, i64, ptr, ptr, ctypes.c_int, ctypes.c_int, u64, u64, u64, ptr]
        fn.restype = i64
    for name in ("dg_normals_f32", "dg_normals_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [ptr, i64, u64, u64, u64]
        fn.restype = None
    for name in ("dg_gram_f32", "dg_gram_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [ptr, i64, i64, i64, ptr]
        fn.restype = None
    for name in ("dg_combine_f32", "dg_combine_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [ptr, i64, i64, i64, ptr, ptr]
        fn.restype = None
    for name in ("dg_scale_f32", "dg_scale_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [ptr, ptr, i64, dbl, dbl]
        fn.restype = None
    lib.dg_set_tables.argtypes = [ptr, ptr, ptr, ptr]
    lib.dg_set_tables.restype = None
    tables: list[ctypes.Array[Any]] = [
        (ctypes.c_double * len(ZIGGURAT_X))(*ZIGGURAT_X),
        (ctypes.c_double * len(ZIGGURAT_F))(*ZIGGURAT_F),
        (ctypes.c_float * len(ZIGGURAT_W))(*ZIGGURAT_W),
        (ctypes.c_uint32 * len(ZIGGURAT_T))(*ZIGGURAT_T),
    ]
    lib.dg_set_tables(*(ctypes.addressof(t) for t in tables))


def library() -> ctypes.CDLL | None:
    """The loaded native library, or ``None`` where it is turned off or cannot be built
    (then one ``RuntimeWarning`` gives the reason; the rules run on torch operations)."""
    with _lock:
        if "lib" not in _state:
            _state["lib"] = None
            if os.environ.get("DOMAINGRAD_NATIVE", "1") == "0":
                _state["reason"] = "turned off by DOMAINGRAD_NATIVE=0"
            else:
                try:
                    _state["lib"] = _load()
                except Exception as err:  # noqa: BLE001 - any failure means: use torch
                    _state["reason"] = str(err)
                    warnings.warn(
                        f"domaingrad's native surgery kernels are not available ({err}); Agr-Sum, Agr-Rand, "
                        "PCGrad and CorGrad use torch operations instead: same results, slower. Set "
                        "DOMAINGRAD_NATIVE=0 to silence.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        return _state["lib"]


def usable(t: Tensor) -> bool:
    """Whether the kernels take ``t``: a CPU float32/float64 tensor, and the library loads."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and library() is not None


def kernel(name: str, dtype: torch.dtype) -> Any:
    """The loaded library's kernel ``name`` for ``dtype`` (``dg_agree`` and float32 give
    ``dg_agree_f32``); only called where :func:`usable` holds."""
    lib = library()
    assert lib is not None
    return getattr(lib, f"{name}_{'f32' if dtype == torch.float32 else 'f64'}")


def ranges(length: int) -> list[tuple[int, int]]:
    """``(start, count)`` of the consecutive ranges of at most :data:`RANGE` that cover
    ``0 .. length - 1``: the units of work of :func:`run_ranges`."""
    return [(a, min(RANGE, length - a)) for a in range(0, length, RANGE)]


def run_ranges(tasks: Sequence[_T], fn: Callable[[_T], Any]) -> list[Any]:
    """``[fn(task) for task in tasks]`` on up to ``torch.get_num_threads()`` threads (the
    calling one included, each taking the next task not yet taken, so that unequal tasks
    keep every thread busy); the results come back in task order."""
    workers = min(len(tasks), torch.get_num_threads())
    if workers <= 1:
        return [fn(task) for task in tasks]
    results: list[Any] = [None] * len(tasks)
    taken = itertools.count()
    counter_lock = threading.Lock()  # next() of a count is atomic under the GIL; not without one

    def work(_: int) -> None:
        while True:
            with counter_lock:
                j = next(taken)
            if j >= len(tasks):
                return
            results[j] = fn(tasks[j])

    with _lock:
        pool = _state.get("pool")
        if pool is None or _state["pool_size"] < workers - 1:
            if pool is not None:
                pool.shutdown(wait=False)
            pool = ThreadPoolExecutor(max_workers=workers - 1, thread_name_prefix="domaingrad-surgery")
            _state["pool"], _state["pool_size"] = pool, workers - 1
    helpers = [pool.submit(work, w) for w in range(1, workers)]
    work(0)
    for helper in helpers:
        helper.result()
    return results
