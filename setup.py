"""Build frontiers_fast.

The C++ CPU kernels are always built (with OpenMP).  The CUDA kernels are
added only when torch is a CUDA build *and* nvcc can be found: we never ask
whether a GPU is visible, so a GPU-less build box still produces a CUDA build.

Environment switches:
  FRONTIERS_FAST_NO_EXT=1       build no native code at all (pure Python + Triton)
  FRONTIERS_FAST_NO_CUDA=1      build the CPU extension only
  FRONTIERS_FAST_PORTABLE=1     do not tune the C++ code for the build machine (-march=native)
  FRONTIERS_FAST_CUDA_ARCH      e.g. "8.0;9.0" (default: 8.0;9.0)

Sources are found by name, and a file under csrc/ that fits no rule stops the
build (a silently skipped kernel would only show up as a missing backend):
  csrc/init.cpp                  the module entry point
  csrc/<family>/*_cpu.cpp        C++ kernels and their CPU registrations (always built)
  csrc/<family>/*.cu             CUDA kernels, no torch headers (CUDA builds)
  csrc/<family>/*_cuda.cpp       their torch bindings (CUDA builds)
  csrc/<family>/*.h, *.cuh       headers
"""

import os
import platform
import shutil

from setuptools import find_packages, setup


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def native_sources(root):
    """(cpu, cuda): the sources under ``root`` by the naming rules above; SystemExit on any other file."""
    cpu, cuda, unknown = [], [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        depth = os.path.relpath(dirpath, root).count(os.sep) + (dirpath != root)
        for f in sorted(filenames):
            path = os.path.join(dirpath, f)
            if depth == 0:
                (cpu if f == "init.cpp" else unknown).append(path)
            elif depth > 1:
                unknown.append(path)
            elif f.endswith("_cpu.cpp"):
                cpu.append(path)
            elif f.endswith(".cu") or f.endswith("_cuda.cpp"):
                cuda.append(path)
            elif not (f.endswith(".h") or f.endswith(".cuh")):
                unknown.append(path)
    if unknown:
        raise SystemExit(
            "setup.py: these files under csrc/ fit no build rule, so they would be left out: "
            + ", ".join(unknown)
            + ".  Name C++ kernels csrc/<family>/*_cpu.cpp, CUDA kernels *.cu, CUDA bindings *_cuda.cpp, "
            "headers *.h or *.cuh (see the docstring of setup.py)."
        )
    return cpu, cuda


def get_extensions():
    if _flag("FRONTIERS_FAST_NO_EXT"):
        return []
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    cpu_sources, cuda_sources = native_sources("csrc")
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-DNDEBUG"]
    if not _flag("FRONTIERS_FAST_PORTABLE") and platform.machine() in ("x86_64", "AMD64"):
        cxx.append("-march=native")
    link = ["-fopenmp"]

    nvcc_found = CUDA_HOME is not None or shutil.which("nvcc") is not None
    use_cuda = torch.version.cuda is not None and nvcc_found and not _flag("FRONTIERS_FAST_NO_CUDA")
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", os.environ.get("FRONTIERS_FAST_CUDA_ARCH", "8.0;9.0"))
        return [
            CUDAExtension(
                "frontiers_fast._C",
                cpu_sources + cuda_sources,
                include_dirs=[os.path.join(here, "csrc")],
                define_macros=[("FRONTIERS_FAST_WITH_CUDA", "1")],
                extra_compile_args={
                    "cxx": cxx,
                    "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"],
                },
                extra_link_args=link,
            )
        ]
    return [
        CppExtension(
            "frontiers_fast._C",
            cpu_sources,
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    ]


def get_cmdclass():
    if _flag("FRONTIERS_FAST_NO_EXT"):
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="frontiers_fast",
    version="0.1.0",
    description="Fast, validated kernels for newer neural-network architectures",
    packages=find_packages(include=["frontiers_fast", "frontiers_fast.*"]) + ["frontiers_fast.kernels"],
    package_dir={"frontiers_fast.kernels": "kernels"},
    package_data={"frontiers_fast": ["data/*.npz", "data/LICENSE*", "data/*.md"]},
    ext_modules=get_extensions(),
    cmdclass=get_cmdclass(),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "torch_geometric", "triton", "mambapy", "torchdeq", "gsplat", "transformers"],
        "bench": [
            "matplotlib",
            "pytest-benchmark",
            "torch_geometric",
            "triton",
            "mambapy",
            "torchdeq",
            "gsplat",
            "transformers",
        ],
        "dev": ["ruff"],
    },
)
