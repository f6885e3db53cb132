"""Builds the omnimoe torch extension against the installed PyTorch.

    pip install --no-build-isolation ./python

Two steps: CMake builds the repository's library (python/cmake/CMakeLists.txt adds the
repository's own CMake project, unchanged, and links it into libomnimoe_torch.so), then
torch.utils.cpp_extension builds the binding (python/csrc) against torch and that library.

Environment:
    OMNIMOE_CUDA=auto|1|0       CUDA backend: auto (default) builds it when torch has CUDA
                                and a CUDA toolkit is found; 1 requires it; 0 builds CPU-only.
    OMNIMOE_PYTHON_BUILD_DIR    CMake build folder (default: <repository>/build-python).
    MAX_JOBS                    parallel compile jobs (default: all cores).
    CUDA_HOME                   the CUDA toolkit (else nvcc on PATH, else /usr/local/cuda).
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def fail(message):
    sys.stderr.write(f"\nomnimoe: {message}\n\n")
    raise SystemExit(1)


def note(message):
    print(f"omnimoe: {message}", flush=True)


def import_torch():
    """The installed torch. pip's build isolation hides the environment's packages; the
    extension must be built against the torch that will run it, so look there too."""
    try:
        import torch  # noqa: F401
    except ImportError:
        paths = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
        sys.path.extend(p for p in paths if p not in sys.path)
        try:
            import torch  # noqa: F401
        except ImportError:
            fail(
                "PyTorch is needed to build this package and was not found. Install torch first, "
                "then build against it:\n    pip install --no-build-isolation ./python"
            )
        note(f"using the installed torch from {Path(torch.__file__).parent} (build isolation bypassed)")
    import torch

    return torch


torch = import_torch()
from torch.utils import cpp_extension  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def check_tools():
    cmake = shutil.which("cmake")
    if cmake is None:
        fail("cmake (>= 3.24) not found on PATH: install it (Debian: apt-get install cmake ninja-build)")
    out = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"(\d+)\.(\d+)", out)
    if m is None or (int(m.group(1)), int(m.group(2))) < (3, 24):
        fail(f"cmake >= 3.24 is needed, found: {out.splitlines()[0] if out else 'unknown version'}")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        fail(f"no C++ compiler ('{cxx}' not on PATH): install a C++20 compiler (Debian: apt-get install g++) or set CXX")
    return cmake


def cuda_choice():
    """(build the CUDA backend?, nvcc path or None)."""
    want = os.environ.get("OMNIMOE_CUDA", "auto").strip().lower()
    if want not in ("auto", "1", "0", "on", "off", "true", "false"):
        fail(f"OMNIMOE_CUDA must be auto, 1 or 0, got '{want}'")
    if want in ("0", "off", "false"):
        note("building CPU-only (OMNIMOE_CUDA=0)")
        return False, None
    required = want != "auto"
    if torch.version.cuda is None:
        if required:
            fail(f"OMNIMOE_CUDA=1 but the installed torch {torch.__version__} has no CUDA support")
        note(f"building CPU-only: the installed torch {torch.__version__} has no CUDA support")
        return False, None
    home = cpp_extension.CUDA_HOME
    nvcc = Path(home, "bin", "nvcc") if home else None
    if nvcc is None or not nvcc.exists():
        if required:
            fail("OMNIMOE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME or put nvcc on PATH")
        note(
            f"building CPU-only: torch {torch.__version__} has CUDA {torch.version.cuda} but no CUDA toolkit "
            "was found (set CUDA_HOME or put nvcc on PATH for the CUDA backend)"
        )
        return False, None
    note(f"building with CUDA: torch {torch.__version__} (CUDA {torch.version.cuda}), toolkit {home}")
    return True, str(nvcc)


def build_library(build_dir, use_cuda, nvcc):
    """Configure and build libomnimoe_torch.so; returns its path."""
    cmake = check_tools()
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    args = [
        cmake, "-S", str(HERE / "cmake"), "-B", str(build_dir),
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DOMNIMOE_ROOT={ROOT}",
        f"-DOMNIMOE_CUDA={'ON' if use_cuda else 'OFF'}",
        # The binding and the library exchange std::string (Status): same ABI as torch.
        f"-DCMAKE_CXX_FLAGS={abi}",
    ]
    if use_cuda:
        args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_FLAGS=-Xcompiler={abi}"]
    if not (build_dir / "CMakeCache.txt").exists() and shutil.which("ninja"):
        args += ["-G", "Ninja"]
    jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
    note(f"building the library in {build_dir}")
    for cmd in (args, [cmake, "--build", str(build_dir), "--target", "omnimoe_torch", "-j", jobs]):
        if subprocess.run(cmd).returncode != 0:
            fail(f"the library build failed: {' '.join(cmd)}")
    got_cuda = (build_dir / "omnimoe_cuda.txt").read_text().strip() == "ON"
    if got_cuda != use_cuda:
        fail(f"CMake {'found' if got_cuda else 'did not find'} the CUDA toolkit, unlike this setup (use_cuda={use_cuda})")
    return build_dir / "libomnimoe_torch.so"


class Build(BuildExtension):
    def build_extensions(self):
        lib = build_library(BUILD_DIR, USE_CUDA, NVCC)
        super().build_extensions()
        # The extension finds the library in its own folder (rpath $ORIGIN).
        for ext in self.extensions:
            dest = Path(self.get_ext_fullpath(ext.name)).parent
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib, dest / lib.name)


BUILD_DIR = Path(os.environ.get("OMNIMOE_PYTHON_BUILD_DIR") or ROOT / "build-python").resolve()
USE_CUDA, NVCC = cuda_choice()
Extension = CUDAExtension if USE_CUDA else CppExtension
ext = Extension(
    name="omnimoe._C",
    sources=[str(p.relative_to(HERE)) for p in sorted((HERE / "csrc").glob("*.cpp"))],
    include_dirs=[str(ROOT / "include"), str(HERE / "csrc")],
    library_dirs=[str(BUILD_DIR)],
    libraries=["omnimoe_torch"],
    define_macros=[("OMNIMOE_TORCH_CUDA", "1")] if USE_CUDA else [],
    extra_compile_args={"cxx": ["-O2", "-std=c++20"]} if USE_CUDA else ["-O2", "-std=c++20"],
    extra_link_args=["-Wl,-rpath,$ORIGIN"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": Build})
