"""The CPU kernel extension (every ``*.cpp`` in this folder): built on first use, cached per machine.

``load()`` compiles the sources once with the system ``g++`` (``-O3 -fopenmp`` and the ``-march`` of
one ISA variant, torch's headers and libraries; no ninja or setuptools needed; each source is one
object, built in parallel, ~20-30 s each on a 2-core machine) and links them into
``$MISTRALPY_CACHE/cpu_ext`` (default ``~/.cache/mistralpy/cpu_ext``) and loads it with
``torch.ops.load_library``. The file name carries a hash of the source, the flags, the torch and
Python versions and the variant, so an edit, an upgrade or another variant builds a new copy
instead of loading a stale or illegal one; a build goes to a temporary name and is renamed into
place, so concurrent processes never load a half-written library. When anything fails (no
compiler, a build error) it logs one warning and returns False: callers keep torch's kernels.
``MISTRALPY_CPU_EXT=0`` disables it. Sources may share ``kernels.h`` (the ops' C++ entry points, for
sources that call other ops' bodies directly; headers are hashed with the sources).

ISA variants (``VARIANTS``): ``avx512`` (x86-64-v4 + VNNI, + BF16 where the CPU has it), ``avx2``
(x86-64-v3: AVX2, FMA, F16C) and ``scalar`` (plain x86-64, or the compiler's default on other
architectures such as aarch64: the portable code that defines behaviour). The sources pick their
SIMD paths with ``#if defined(__AVX512...__)`` / ``__AVX2__``, so one source builds every variant.
``runnable_variants()`` reads the CPU's flags (``/proc/cpuinfo``, as cpuid reports them);
``load()`` builds the best one the CPU runs, or the one ``MISTRALPY_CPU_ISA=avx512|avx2|scalar``
asks for (a variant the CPU cannot run is refused with a warning, and the best runnable one below
it is used). Each variant is compiled into its own op namespace, ``mistralpy_cpu_<variant>``
(``variant_namespace``), which callers reach through ``ops()``; the tests load every other runnable
variant beside it (``load_variant``) and run the same checks on each.

Each source registers its ops with ``TORCH_LIBRARY_FRAGMENT`` (one library, many files) and reports
the SIMD path it took through its ``*isa`` op; the Python module that wraps a source's ops registers
their fake implementations through ``register_fakes``.
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


_lock = threading.RLock()   # load() holds it while load_variant() takes it again
_state: dict[str, bool] = {}
NAMESPACE_PREFIX = "mistralpy_cpu"   # + "_" + variant


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


VARIANTS = ("avx512", "avx2", "scalar")  # best first
# CPU flags (as /proc/cpuinfo names them) each x86 variant's code needs.
_NEEDS = {"avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx2", "fma", "f16c"),
          "avx2": ("avx2", "fma", "f16c", "bmi2"),
          "scalar": ()}


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def runnable_variants(flags: str | None = None) -> list[str]:
    """The variants this CPU can execute, best first (only ``scalar`` off x86-64)."""
    if not _is_x86():
        return ["scalar"]
    have = set((flags if flags is not None else _cpu_flags()).split())
    return [v for v in VARIANTS if all(f in have for f in _NEEDS[v])]


def march_flags(variant: str) -> list[str]:
    """g++ target flags of a variant."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown CPU ISA variant {variant!r} (one of {', '.join(VARIANTS)})")
    if not _is_x86():
        return []  # the compiler's default target (aarch64: the portable paths; NEON is baseline there)
    if variant == "avx512":
        extra = ["-mavx512bf16"] if "avx512_bf16" in _cpu_flags().split() else []
        return ["-march=x86-64-v4", "-mavx512vnni", *extra, "-mtune=native"]
    return ["-march=x86-64-v3" if variant == "avx2" else "-march=x86-64", "-mtune=native"]


def selected_variant() -> str:
    """The variant ``load()`` takes: MISTRALPY_CPU_ISA if set and runnable, else the best."""
    runnable = runnable_variants()
    want = os.environ.get("MISTRALPY_CPU_ISA", "auto").strip().lower() or "auto"
    if want == "auto":
        return runnable[0]
    if want not in VARIANTS:
        raise ValueError(f"MISTRALPY_CPU_ISA={want!r}: expected auto, {', '.join(VARIANTS)}")
    if want in runnable:
        return want
    lower = [v for v in VARIANTS[VARIANTS.index(want):] if v in runnable]
    log.warning("MISTRALPY_CPU_ISA=%s: this CPU cannot run it; using %s", want, lower[0])
    return lower[0]


def _flags(variant: str) -> list[str]:
    # -ffp-contract=off: g++ would fuse a * b + c of the plain C++ paths into FMAs on FMA targets,
    # changing their float32 results against torch's (the intrinsic FMAs are written out)
    return ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", *march_flags(variant),
            f"-DQMM_NS={variant_namespace(variant)}",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


def library_path(variant: str) -> Path:
    h = hashlib.sha256()
    parts = [src.read_bytes() for src in [*sources(), *sorted(_HERE.glob("*.h"))]]  # headers too
    parts += [" ".join(_flags(variant)).encode(), torch.__version__.encode(), sys.version.encode()]
    for part in parts:
        h.update(part)
    return cache_dir() / f"{variant_namespace(variant)}.{h.hexdigest()[:16]}.so"


def build(variant: str) -> Path:
    """Compile (if not cached) and return the shared library of `variant`."""
    from torch.utils import cpp_extension

    out = library_path(variant)
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
    log.info("building the CPU kernel extension (%s) with g++ (once per machine, ~20-60 s) ...", variant)
    with tempfile.TemporaryDirectory(dir=out.parent) as objdir:
        try:
            objs = _compile_objects(cxx, _flags(variant), includes, Path(objdir))
            _check(subprocess.run([cxx, *_flags(variant), *objs, "-o", tmp, *libs],
                                  check=False, capture_output=True, text=True))
            os.replace(tmp, out)
            for stale in out.parent.glob(f"{variant_namespace(variant)}.*.so"):   # older sources / torch versions
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
_active: list[str] = []   # the namespace load() chose (one entry once loaded)


def register_fakes(hook) -> None:
    """Add hook(namespace) that registers fake (meta) implementations of some ops; it runs for every
    namespace loaded (now, for those already loaded)."""
    _fake_hooks.append(hook)
    for ns in _loaded:
        hook(ns)


def variant_namespace(variant: str) -> str:
    """Each variant's ops live in their own namespace (``mistralpy_cpu_avx2``, ...), so every variant
    can be loaded in one process (the tests run each) and a library serves whichever process picks it."""
    return f"{NAMESPACE_PREFIX}_{variant}"


def load_variant(variant: str) -> str:
    """Load `variant` (built if needed) beside any other; returns its torch.ops namespace name."""
    if variant not in runnable_variants():
        raise RuntimeError(f"this CPU cannot run the {variant} variant")
    ns = variant_namespace(variant)
    if ns not in _loaded:
        with _lock:
            if ns not in _loaded:
                torch.ops.load_library(str(build(variant)))
                _loaded.append(ns)
                for hook in _fake_hooks:
                    hook(ns)
    return ns


def loaded_variant() -> str | None:
    """The variant ``load()`` chose (None before it succeeds)."""
    return _active[0].removeprefix(NAMESPACE_PREFIX + "_") if _active else None


def namespace() -> str:
    """The torch.ops namespace of the chosen variant (``load()`` must have succeeded)."""
    if not _active:
        raise RuntimeError("the CPU kernel extension is not loaded")
    return _active[0]


def ops():
    """``torch.ops.<namespace()>``: where the engine's calls to the extension go."""
    return getattr(torch.ops, namespace())


def load() -> bool:
    """Build or load the extension once per process; True when the chosen variant's ops exist."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" not in _state:
            ok = False
            if os.environ.get("MISTRALPY_CPU_EXT", "1") == "0":
                log.debug("CPU kernel extension disabled by MISTRALPY_CPU_EXT=0")
            else:
                try:
                    variant = selected_variant()
                    _active[:] = [load_variant(variant)]
                    ok = True
                    log.info("CPU kernels: %s variant (%s)", variant, isa())
                except Exception as exc:  # noqa: BLE001  (any build/load failure: torch's kernels stay in use)
                    msg = str(exc).strip().splitlines()
                    log.warning("CPU kernel extension unavailable, using torch kernels: %s",
                                msg[-1] if msg else type(exc).__name__)
            _state["ok"] = ok
    return _state["ok"]


def isa(namespace_: str | None = None, op: str = "isa") -> str:
    """The SIMD path a source of a build took (default: the chosen one), as its ``op`` reports it:
    ``isa`` (qmatmul.cpp: avx512vnni, avx2 or scalar), ``dense_isa`` (avx512bf16 or scalar),
    ``fused_isa`` (avx512, avx2 or scalar)."""
    ns = namespace_ or namespace()
    return bytes(getattr(getattr(torch.ops, ns), op)(torch.empty(0)).tolist()).decode()
