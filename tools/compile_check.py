"""Compile check of the CUDA kernels with nvcc alone: no GPU and no CUDA build of torch needed.

Builds csrc/compile_check/all_kernels.cu (the build's nvcc units, csrc/cuda/*.cu, in one
translation unit, without torch's include paths), whose launchers emit every
template instantiation the dispatch macros can reach, once per target architecture (in parallel)
with warnings as errors. Then checks, for every architecture, that each expected kernel was
assembled (ptxas report) and is present in the cubin's symbol table, and prints registers,
spills and shared memory per kernel. Then applies the machine-code rules of tools/sass_check.py
(no MUFU.TANH or 16-bit shared loads in the decode kernel, no CAS loops in the sampler, no local
memory) to each cubin.

    python tools/compile_check.py [--archs 80,90a] [--adapters]

``--adapters`` also compiles the torch adapters (csrc/cuda/*.cpp, host compiler) against the
installed torch's headers; a CPU build of torch lacks one generated CUDA header, which is stubbed
for this check.
Exit status 0 when everything compiled and every kernel was found.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import sass_check

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "compile_check" / "all_kernels.cu"
# The flags setup.py's build passes (its own plus torch.utils.cpp_extension's COMMON_NVCC_FLAGS,
# which disable implicit half / bfloat16 conversions), and warnings as errors.
BUILD_FLAGS = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr",
               "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
               "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
NVCC_FLAGS = [*BUILD_FLAGS, "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]
DTYPES = {"f": "float", "6__half": "__half", "13__nv_bfloat16": "__nv_bfloat16"}
COPY_WORDS = {"5uint4": "uint4", "5uint2": "uint2", "j": "uint32_t", "t": "uint16_t"}


def head_dims() -> list[int]:
    """The head dims DISPATCH_HEAD_DIM serves, read from the header so the list has one home."""
    text = (ROOT / "csrc" / "kernels" / "params.h").read_text()
    match = re.search(r"#define FASTDECODE_CUDA_HEAD_DIMS ([\d, ]+)\n", text)
    return [int(d) for d in match.group(1).split(",")]


def expected_kernels() -> dict[str, str]:
    """Mangled-name fragment -> readable name, for every instantiation the launchers reach."""
    out = {}
    for (mangled, name), d in itertools.product(DTYPES.items(), head_dims()):
        out[f"19paged_decode_kernelI{mangled}Li{d}EE"] = f"paged_decode_kernel<{name}, {d}>"
    for mangled, name in DTYPES.items():
        out[f"25paged_decode_merge_kernelI{mangled}EE"] = f"paged_decode_merge_kernel<{name}>"
        out[f"13sample_kernelI{mangled}EE"] = f"sample_kernel<{name}>"
        out[f"18contrastive_kernelI{mangled}EE"] = f"contrastive_kernel<{name}>"
    for mangled, name in COPY_WORDS.items():
        out[f"16append_kv_kernelI{mangled}EE"] = f"append_kv_kernel<{name}>"
    return out


@dataclass
class Usage:
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0


def parse_ptxas(report: str) -> dict[str, Usage]:
    """Kernel (mangled) -> resource usage, from nvcc --resource-usage output."""
    usage: dict[str, Usage] = {}
    current = None
    for line in report.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            current = usage.setdefault(m.group(1), Usage())
        elif current and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                                         line)):
            current.spill_stores, current.spill_loads = int(m.group(1)), int(m.group(2))
        elif current and (m := re.search(r"Used (\d+) registers", line)):
            current.registers = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current.smem = int(smem.group(1)) if smem else 0
    return usage


def elf_function_symbols(path: Path) -> set[str]:
    """Names of the FUNC symbols in an ELF64 little-endian file (a cubin), without cuobjdump."""
    data = path.read_bytes()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    names = set()
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != 2:  # SHT_SYMTAB
            continue
        strtab_offset = sections[link][4]
        for at in range(offset, offset + size, entsize):
            st_name, st_info = struct.unpack_from("<IB", data, at)
            if st_info & 0xF == 2:  # STT_FUNC
                end = data.index(b"\0", strtab_offset + st_name)
                names.add(data[strtab_offset + st_name:end].decode())
    return names


def compile_arch(nvcc: str, arch: str, out_dir: Path) -> subprocess.Popen:
    cubin = out_dir / f"all_kernels_sm_{arch}.cubin"
    cmd = [nvcc, *NVCC_FLAGS, f"-arch=sm_{arch}", "--resource-usage", "-cubin", "-o", str(cubin),
           str(SOURCE)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def check_kernels(nvcc: str, archs: list[str]) -> bool:
    expected = expected_kernels()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        procs = {arch: compile_arch(nvcc, arch, Path(tmp)) for arch in archs}
        outputs = {arch: proc.communicate()[0] for arch, proc in procs.items()}
        elapsed = time.perf_counter() - start
        print(f"nvcc: {len(expected)} kernels x {len(archs)} archs ({', '.join(archs)}) in "
              f"{elapsed:.1f} s")
        for arch in archs:
            if procs[arch].returncode != 0:
                print(f"FAILED: sm_{arch} compile (exit {procs[arch].returncode}):\n"
                      f"{outputs[arch]}")
                ok = False
                continue
            usage = parse_ptxas(outputs[arch])
            symbols = elf_function_symbols(Path(tmp) / f"all_kernels_sm_{arch}.cubin")
            for fragment, name in expected.items():
                assembled = [k for k in usage if fragment in k]
                in_cubin = any(fragment in s for s in symbols)
                if len(assembled) != 1 or not in_cubin:
                    print(f"MISSING: sm_{arch} {name} (ptxas: {len(assembled)}, cubin: "
                          f"{in_cubin})")
                    ok = False
                    continue
                u = usage[assembled[0]]
                print(f"sm_{arch:<4} {name:<42} regs {u.registers:>3}  spill "
                      f"{u.spill_stores}/{u.spill_loads} B  smem {u.smem:>6} B")
                if u.spill_stores or u.spill_loads:
                    print(f"  note: {name} spills registers on sm_{arch}")
            ok = check_sass(Path(tmp) / f"all_kernels_sm_{arch}.cubin") and ok
    return ok


def check_sass(cubin: Path) -> bool:
    cuobjdump = sass_check.find_cuobjdump()
    if cuobjdump is None:
        print("FAILED: no cuobjdump for the SASS rules (CUDA toolkit or triton's NVIDIA backend)")
        return False
    problems = sass_check.check_cubin(cubin, cuobjdump)
    for line in problems:
        print(f"SASS rule broken: {line}")
    print(f"SASS rules ({cubin.stem}): {'FAILED' if problems else 'passed'}")
    return not problems


def check_adapters(nvcc: str) -> bool:
    """Compile the torch adapters (csrc/cuda/*.cpp) with the host compiler against torch's and the
    CUDA toolkit's headers, as the build does (object files only, nothing is linked). The kernels'
    translation units need no torch header: check_kernels builds them without torch's paths."""
    import torch.utils.cpp_extension as cpp

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        print("FAILED: no host C++ compiler for the adapters")
        return False
    with tempfile.TemporaryDirectory() as tmp:
        include = [*cpp.include_paths(), sysconfig.get_paths()["include"],
                   str(cuda_include(nvcc))]
        generated = Path(include[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        if not generated.exists():  # CPU builds of torch do not ship this generated header
            stub = Path(tmp) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
            stub.parent.mkdir(parents=True)
            stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
            include.append(tmp)
        start = time.perf_counter()
        procs = {}
        for source in sorted((ROOT / "csrc" / "cuda").glob("*.cpp")):
            cmd = [cxx, "-O1", "-std=c++20", "-fPIC", "-Wall", "-Wextra", "-Werror",
                   "-DFASTDECODE_WITH_CUDA", *[f"-isystem{p}" for p in include], "-c", str(source),
                   "-o", str(Path(tmp) / (source.stem + ".o"))]
            procs[source.name] = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True)
        ok = True
        for name, proc in procs.items():
            output = proc.communicate()[0]
            print(f"adapter {name}: " + ("ok" if proc.returncode == 0 else
                                         f"FAILED (exit {proc.returncode})\n{output}"))
            ok = ok and proc.returncode == 0
        print(f"adapters: {len(procs)} compiled in {time.perf_counter() - start:.1f} s")
    return ok


def cuda_include(nvcc: str) -> Path:
    """The CUDA toolkit's include directory (torch's CUDA_HOME is unset in a CPU build; nvcc may
    be a wrapper script outside the toolkit), as nvcc itself reports it."""
    proc = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", "/dev/null"], capture_output=True,
                          text=True)
    top = re.search(r"^#\$ TOP=(\S+)", proc.stderr + proc.stdout, re.MULTILINE)
    return Path(top.group(1)).resolve() / "include" if top else Path(nvcc).parent.parent / "include"


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [shutil.which("nvcc")]
    if cuda_home:
        candidates.append(str(Path(cuda_home) / "bin" / "nvcc"))
    return next((c for c in candidates if c and Path(c).exists()), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="80,90a", help="comma-separated sm_ targets")
    parser.add_argument("--adapters", action="store_true",
                        help="also compile the torch adapters (needs torch's headers)")
    args = parser.parse_args()
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        return 2
    archs = args.archs.split(",")
    ok = check_kernels(nvcc, archs)
    if args.adapters:
        ok = check_adapters(nvcc) and ok
    print("compile check:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
