"""Builds fastdecode._C: the CPU kernels always, the CUDA kernels when torch has CUDA.

Environment:
  FASTDECODE_BUILD_CUDA=0|1  force the CUDA kernels off / on (default: on iff torch.version.cuda
                             and a CUDA toolkit are present), so a CPU machine never spends
                             minutes in nvcc during `pip install`.
  FASTDECODE_CPU_ARCH        -march value for the CPU kernels (default: native; the extension is
                             built from source on the machine that runs it).
  FASTDECODE_CUDA_ARCHS      nvcc -gencode list (default: "80;90a").
"""

import os
from pathlib import Path

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent


def _want_cuda() -> bool:
    flag = os.environ.get("FASTDECODE_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    cpu_arch = os.environ.get("FASTDECODE_CPU_ARCH", "native")
    cxx = ["-O3", "-std=c++20", "-fopenmp", f"-march={cpu_arch}", "-ffp-contract=fast"]
    sources = ["csrc/bindings.cpp"] + sorted(str(p) for p in (ROOT / "csrc/cpu").glob("*.cpp"))
    sources = [str(Path(s).relative_to(ROOT)) if Path(s).is_absolute() else s for s in sources]
    if not _want_cuda():
        return CppExtension("fastdecode._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=["-fopenmp"])
    archs = os.environ.get("FASTDECODE_CUDA_ARCHS", "80;90a").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # csrc/cuda/*_kernels.cu (nvcc) hold the kernels behind plain launchers and include no torch
    # header; csrc/cuda/*.cpp, the torch adapters, are compiled by the host compiler with `cxx`.
    # torch's C++ compiled through nvcc crashed when formatting error messages.
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cuda").glob("*.c[up]*"))
    nvcc = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", *gencode]
    return CUDAExtension("fastdecode._C", sources + cuda_sources,
                         extra_compile_args={"cxx": cxx + ["-DFASTDECODE_WITH_CUDA"],
                                             "nvcc": nvcc + ["-DFASTDECODE_WITH_CUDA"]},
                         extra_link_args=["-fopenmp"])


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
