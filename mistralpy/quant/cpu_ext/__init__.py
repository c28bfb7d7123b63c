"""The CPU kernel extension (every ``*.cpp`` in this folder): built on first use, cached per machine.

``load()`` compiles the sources once with the system ``g++`` (``-O3 -march=native -fopenmp``,
torch's headers and libraries; no ninja or setuptools needed; each source is one object, built in
parallel, ~20-30 s each on a 2-core machine) and links them into
``$MISTRALPY_CACHE/cpu_ext`` (default ``~/.cache/mistralpy/cpu_ext``) and loads it with
``torch.ops.load_library``. The file name carries a hash of the source, the flags, the torch and
Python versions and this CPU's ISA flags, so an edit, an upgrade or another CPU builds a new copy
instead of loading a stale or illegal one; a build goes to a temporary name and is renamed into
place, so concurrent processes never load a half-written library. When anything fails (no
compiler, a build error) it logs one warning and returns False: callers keep torch's kernels.
``MISTRALPY_CPU_EXT=0`` disables it. Sources may share ``kernels.h`` (the ops' C++ entry points, for
sources that call other ops' bodies directly; headers are hashed with the sources).

Registers ``torch.ops.mistralpy_cpu.qmm(x [M, K], w uint8, fmt, n) -> y [M, n]`` (weight formats:
``qmatmul.cpp``'s header; its fake implementation is in ``quant/gguf_kernels_cpu.py``), so
torch.compile traces it as one op, and ``torch.ops.mistralpy_cpu.isa`` (which SIMD path the build took). Each source registers its ops
with ``TORCH_LIBRARY_FRAGMENT`` (one library, many files); the Python module that wraps a source's
ops registers their fake implementations through ``register_fakes``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_HERE = Path(__file__).parent


def sources() -> list[Path]:
    return sorted(_HERE.glob("*.cpp"))
_lock = threading.Lock()
_state: dict[str, bool] = {}
NAMESPACE = "mistralpy_cpu"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    root = os.environ.get("MISTRALPY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mistralpy")
    return Path(root) / "cpu_ext"


def _flags(namespace: str, march: str) -> list[str]:
    return ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", f"-march={march}", f"-DQMM_NS={namespace}",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


def library_path(namespace: str = NAMESPACE, march: str = "native") -> Path:
    h = hashlib.sha256()
    parts = [src.read_bytes() for src in [*sources(), *sorted(_HERE.glob("*.h"))]]  # headers too
    parts += [" ".join(_flags(namespace, march)).encode(), torch.__version__.encode(), _cpu_flags().encode(),
              sys.version.encode()]
    for part in parts:
        h.update(part)
    return cache_dir() / f"{namespace}_{h.hexdigest()[:16]}.so"


def build(namespace: str = NAMESPACE, march: str = "native") -> Path:
    """Compile (if not cached) and return the shared library for `namespace` (`march`: g++ -march)."""
    from torch.utils import cpp_extension

    out = library_path(namespace, march)
    if out.exists():
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) found")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [*(f"-L{p}" for p in cpp_extension.library_paths()),
            *(f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()), "-lc10", "-ltorch_cpu", "-ltorch"]
    log.info("building the CPU kernel extension with g++ (once per machine, ~20-60 s) ...")
    with tempfile.TemporaryDirectory(dir=out.parent) as objdir:
        try:
            objs = _compile_objects(cxx, _flags(namespace, march), includes, Path(objdir))
            _check(subprocess.run([cxx, *_flags(namespace, march), *objs, "-o", tmp, *libs],
                                  check=False, capture_output=True, text=True))
            os.replace(tmp, out)
            for stale in out.parent.glob(f"{namespace}_*.so"):   # builds of older sources / torch versions
                if stale != out:
                    stale.unlink(missing_ok=True)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


def _compile_objects(cxx: str, flags: list[str], includes: list[str], objdir: Path) -> list[str]:
    """One object per source, compiled side by side (they are independent translation units)."""
    jobs = []
    for src in sources():
        obj = str(objdir / (src.stem + ".o"))
        cmd = [cxx, *(f for f in flags if f != "-shared"), "-c", *includes, str(src), "-o", obj]
        jobs.append((obj, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for _, proc in jobs:
        _, err = proc.communicate()
        _check(subprocess.CompletedProcess(proc.args, proc.returncode, "", err))
    return [obj for obj, _ in jobs]


def _check(res: subprocess.CompletedProcess) -> None:
    if res.returncode != 0:
        raise RuntimeError(f"g++ failed: {res.stderr.strip()[-2000:]}")


_fake_hooks: list = []
_loaded: list[str] = []


def register_fakes(hook) -> None:
    """Add hook(namespace) that registers fake (meta) implementations of some ops; it runs for every
    namespace loaded (now, for those already loaded)."""
    _fake_hooks.append(hook)
    for namespace in _loaded:
        hook(namespace)


def load_namespace(namespace: str, march: str) -> None:
    """Build and load one variant (tests load a portable ``-march=x86-64`` one beside the native one)."""
    torch.ops.load_library(str(build(namespace, march)))
    _loaded.append(namespace)
    for hook in _fake_hooks:
        hook(namespace)


def load() -> bool:
    """Build or load the extension once per process; True when ``torch.ops.mistralpy_cpu.qmm`` exists."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" not in _state:
            ok = False
            if os.environ.get("MISTRALPY_CPU_EXT", "1") == "0":
                log.debug("CPU kernel extension disabled by MISTRALPY_CPU_EXT=0")
            elif platform.machine() not in ("x86_64", "AMD64"):
                log.debug("CPU kernel extension: x86-64 only, using torch kernels")
            else:
                try:
                    load_namespace(NAMESPACE, "native")
                    ok = True
                    log.debug("CPU kernel extension loaded (%s)", isa())
                except Exception as exc:  # noqa: BLE001  (any build/load failure: torch's kernels stay in use)
                    msg = str(exc).strip().splitlines()
                    log.warning("CPU kernel extension unavailable, using torch kernels: %s",
                                msg[-1] if msg else type(exc).__name__)
            _state["ok"] = ok
    return _state["ok"]


def isa(namespace: str = NAMESPACE, op: str = "isa") -> str:
    """The SIMD path a source of the build took, as its ``op`` reports it: ``isa`` (qmatmul.cpp:
    avx512vnni or scalar), ``dense_isa`` (avx512bf16 or scalar), ``fused_isa`` (avx512 or scalar)."""
    return bytes(getattr(getattr(torch.ops, namespace), op)(torch.empty(0)).tolist()).decode()
