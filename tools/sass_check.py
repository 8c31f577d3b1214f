"""Rules on the machine code (SASS) of the compiled CUDA kernels, checked without a GPU.

A kernel can compile, pass the emulator and still be slow or inaccurate on the GPU because of
what nvcc made of it. These rules read the disassembly (cuobjdump -sass) of the cubins that
tools/compile_check.py builds and catch that class of problem in CI:

- no MUFU.TANH in the decode kernel: softcap promises float32 accuracy, and --use_fast_math
  turns tanhf into that 2^-11 approximation (the kernel uses accurate_tanh);
- 128-bit shared loads (LDS.128) and no 16-bit ones in the decode kernel: the KV tile is read
  as 16-byte vectors, converted in registers;
- no shared-memory compare-and-swap loops in the sampler (64-bit shared atomics compile to
  them; its histograms use 32-bit atomics);
- no local memory (LDL / STL) in any kernel: register spills or dynamically indexed arrays.

    python tools/sass_check.py CUBIN [CUBIN ...]
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Rule:
    """Kernels whose mangled name contains ``kernel`` must contain every opcode prefix of
    ``require`` and none of ``forbid``."""

    kernel: str
    why: str
    require: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()


RULES = (
    Rule("paged_decode_kernel", "softcap is float32-accurate (no tanh.approx)",
         forbid=("MUFU.TANH",)),
    Rule("paged_decode_kernel", "the KV tile is read with 128-bit shared loads",
         require=("LDS.128",), forbid=("LDS.U16", "LDS.S16", "LDS.U8", "LDS.S8")),
    Rule("sample_kernel", "32-bit shared atomics, no compare-and-swap loops",
         forbid=("ATOMS.CAS",)),
    Rule("", "no local memory (spills or dynamically indexed arrays)", forbid=("LDL", "STL")),
)

_FUNCTION = re.compile(r"^\s*Function : (\S+)", re.M)
# "/*0090*/   @!P0 LDS.128 R4, [R2] ;" -> "LDS.128"
_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")


def find_cuobjdump() -> str | None:
    """cuobjdump of the CUDA toolkit, else the one Triton's NVIDIA backend ships."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    for candidate in (shutil.which("cuobjdump"), str(Path(home) / "bin" / "cuobjdump")):
        if candidate and Path(candidate).exists():
            return candidate
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return None
    bundled = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


def opcodes_by_function(sass: str) -> dict[str, list[str]]:
    """Mangled function name -> its opcodes in order, from ``cuobjdump -sass`` output."""
    out: dict[str, list[str]] = {}
    starts = list(_FUNCTION.finditer(sass))
    for i, match in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(sass)
        out[match.group(1)] = _INSTRUCTION.findall(sass, match.end(), end)
    return out


def violations(functions: dict[str, list[str]], rules=RULES) -> list[str]:
    """One line per broken rule and kernel."""
    found = []
    for name, ops in functions.items():
        for rule in rules:
            if rule.kernel not in name:
                continue
            bad = sorted({op for op in ops for f in rule.forbid if op.startswith(f)})
            missing = [r for r in rule.require if not any(op.startswith(r) for op in ops)]
            if bad or missing:
                what = ", ".join([f"has {op}" for op in bad] + [f"no {r}" for r in missing])
                found.append(f"{name}: {what} ({rule.why})")
    return found


def check_cubin(cubin: Path, cuobjdump: str) -> list[str]:
    """Violations in one cubin; a kernel named by a rule must be present."""
    sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    functions = opcodes_by_function(sass)
    absent = [f"{cubin.name}: no kernel matching {r.kernel!r}" for r in RULES
              if r.kernel and not any(r.kernel in name for name in functions)]
    return absent + violations(functions)


def main() -> int:
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        print("cuobjdump not found (CUDA toolkit, or triton's NVIDIA backend)")
        return 2
    problems = [p for cubin in sys.argv[1:] for p in check_cubin(Path(cubin), cuobjdump)]
    print("\n".join(problems) or "SASS rules: passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
