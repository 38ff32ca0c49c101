"""What this CPU runs natively: the CPU flags (``/proc/cpuinfo``) and OpenVINO's CPU device capabilities.

bf16 counts as native when both agree: OpenVINO's CPU device lists ``BF16`` in its
``OPTIMIZATION_CAPABILITIES`` (``ov::device::capabilities``) and the CPU has a bf16 instruction set, AVX-512 BF16
(``avx512_bf16``) or AMX BF16 (``amx_bf16``), the Linux kernel's names in ``/proc/cpuinfo`` (arch/x86/include/
asm/cpufeatures.h). Without them OpenVINO would emulate or refuse bf16, which is not what a build measured.

The build records :meth:`CpuCapabilities.to_list` in the manifest; the scheduler compares it with the serving
CPU's (:func:`missing_capabilities`) and treats a variant needing what the serving CPU lacks like emulated fp16.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

# CPU flags (Linux /proc/cpuinfo names) that run bf16 matrix products in hardware
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# flags recorded in the manifest: the instruction sets the CPU variants' speed depends on
RECORDED_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
)
BF16 = "bf16"  # the capability name a bf16 variant requires (VariantEntry.requires_cpu)
# x86 instructions that multiply uint8 activations by int8 weights straight into int32. Without them (AVX2 or
# AVX-512F only) ONNX Runtime's and oneDNN's u8s8 kernels sum pairs of products in int16 (vpmaddubsw), which
# saturates with 8-bit weights; ONNX Runtime's quantization guide prescribes 7-bit weights (``reduce_range``)
# for such CPUs ("Quantize ONNX models": "reduce_range ... for U8S8 format on AVX2 and AVX512 (non-VNNI)").
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
INT8_FULL_RANGE = "int8_full_range"  # the capability name an int8 graph with 8-bit weights requires
X86 = ("x86_64", "amd64", "i386", "i686")


@dataclass(frozen=True)
class CpuCapabilities:
    """``flags``: the :data:`RECORDED_FLAGS` this CPU has; ``openvino``: OpenVINO's CPU
    ``OPTIMIZATION_CAPABILITIES`` (empty when openvino is not installed); ``model``: the CPU's name."""

    flags: frozenset[str]
    openvino: frozenset[str]
    model: str = ""
    arch: str = ""  # platform.machine(); "" (unknown) counts as a CPU whose int8 does not saturate

    @property
    def native_bf16(self) -> bool:
        return "BF16" in self.openvino and any(f in self.flags for f in BF16_FLAGS)

    @property
    def int8_saturates(self) -> bool:
        """An x86 CPU without VNNI: int8 graphs need 7-bit weights here (:data:`VNNI_FLAGS`)."""
        return self.arch.lower() in X86 and not any(f in self.flags for f in VNNI_FLAGS)

    def to_list(self) -> list[str]:
        """Capability names, sorted: the recorded CPU flags, ``openvino:<CAP>`` for OpenVINO's, and
        :data:`BF16` where bf16 is native, :data:`INT8_FULL_RANGE` where int8 does not saturate."""
        names = set(self.flags) | {f"openvino:{c}" for c in self.openvino}
        if self.native_bf16:
            names.add(BF16)
        if not self.int8_saturates:
            names.add(INT8_FULL_RANGE)
        return sorted(names)

    def summary(self) -> str:
        flags = ", ".join(sorted(self.flags)) or "none of " + ", ".join(RECORDED_FLAGS)
        ov = ", ".join(sorted(self.openvino)) or "none (openvino not installed)"
        return f"CPU flags: {flags}; OpenVINO CPU capabilities: {ov}"


def parse_cpuinfo(text: str) -> tuple[frozenset[str], str]:
    """(flags of the first processor, its model name) from ``/proc/cpuinfo`` text."""
    flags: frozenset[str] = frozenset()
    model = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = frozenset(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    return flags, model


def openvino_cpu_capabilities() -> frozenset[str]:
    """OpenVINO's CPU ``OPTIMIZATION_CAPABILITIES``, e.g. {"FP32", "BF16", "INT8", ...}; empty without
    openvino."""
    try:
        import openvino as ov
    except ImportError:
        return frozenset()
    return frozenset(str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


@functools.cache
def cpu_capabilities() -> CpuCapabilities:
    """This machine's :class:`CpuCapabilities` (read once per process)."""
    info = Path("/proc/cpuinfo")
    flags, model = parse_cpuinfo(info.read_text()) if info.is_file() else (frozenset(), "")
    return CpuCapabilities(
        flags=flags & frozenset(RECORDED_FLAGS),
        openvino=openvino_cpu_capabilities(),
        model=model or platform.processor() or platform.machine(),
        arch=platform.machine(),
    )


def native_bf16() -> bool:
    """Whether this CPU runs bf16 natively (see the module docstring)."""
    return cpu_capabilities().native_bf16


def missing_capabilities(required: list[str], available: list[str] | frozenset[str] | set[str]) -> list[str]:
    """The names of ``required`` not in ``available`` (e.g. ``["bf16"]`` on a CPU without native bf16)."""
    have = set(available)
    return [r for r in required if r not in have]
