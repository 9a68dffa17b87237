"""Build targets: CPU instruction-set levels from /proc/cpuinfo text, GPU targets from nvidia-smi names, and what a
worker may advertise (``--targets``)."""

from __future__ import annotations

import re

import pytest

from backends.gpu import GpuInfo
from backends.targets import (
    TARGET_PATTERN,
    Target,
    cpu_target,
    cpu_target_id,
    detect_targets,
    gpu_target,
    gpu_target_id,
    isa_level,
    parse_cpu_flags,
    resolve_targets,
    slug,
)

# Abridged /proc/cpuinfo of real parts (the flags that matter, in the kernel's spelling).
SKYLAKE_CLIENT = (
    "processor\t: 0\nmodel name\t: Intel(R) Core(TM) i7-6700\nflags\t\t: fpu sse4_1 sse4_2 avx avx2 fma f16c\n"
)
ICELAKE_SERVER = (
    "processor\t: 0\nflags\t\t: sse4_1 sse4_2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni\n"
    "processor\t: 1\nflags\t\t: sse4_1\n"  # only the first processor is read
)
SAPPHIRE_RAPIDS = (
    "flags\t\t: avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni avx_vnni amx_bf16 amx_tile amx_int8\n"
)
ALDER_LAKE = "flags\t\t: sse4_1 sse4_2 avx avx2 fma avx_vnni\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 asimddp sve i8mm bf16\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull asimddp\n"

H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", "GPU-a", "9.0", 81559 << 20, "550.54.15", "12.4")
L4 = GpuInfo(1, "NVIDIA L4", "GPU-b", "8.9", 23034 << 20, "550.54.15", "12.4")


@pytest.mark.parametrize(
    ("machine", "cpuinfo", "target"),
    [
        ("x86_64", SKYLAKE_CLIENT, "cpu-x86_64-avx2"),
        ("x86_64", ICELAKE_SERVER, "cpu-x86_64-avx512vnni"),
        ("x86_64", SAPPHIRE_RAPIDS, "cpu-x86_64-amx"),
        ("x86_64", ALDER_LAKE, "cpu-x86_64-avxvnni"),
        ("AMD64", "flags : avx\n", "cpu-x86_64-avx"),
        ("x86_64", "", "cpu-x86_64-base"),  # no /proc/cpuinfo (not Linux): coarse but still an identity
        ("aarch64", GRAVITON3, "cpu-aarch64-sve-i8mm"),
        ("arm64", GRAVITON2, "cpu-aarch64-dotprod"),
        ("riscv64", "isa : rv64imafdc\n", "cpu-riscv64-base"),
    ],
)
def test_cpu_targets_of_real_parts(machine: str, cpuinfo: str, target: str) -> None:
    assert cpu_target_id(machine, cpuinfo) == target
    assert TARGET_PATTERN.fullmatch(target)


def test_flags_come_from_the_first_processor() -> None:
    assert "avx512f" in parse_cpu_flags(ICELAKE_SERVER)
    assert parse_cpu_flags("model name : x\n") == set()
    assert isa_level("x86_64", {"avx", "avx2"}) == "avx"  # AVX2 without FMA is not the avx2 level


def test_gpu_targets_match_the_gpu_operators_node_label() -> None:
    assert gpu_target_id(H100) == "gpu-nvidia-h100-80gb-hbm3-sm90"
    assert gpu_target_id(L4) == "gpu-nvidia-l4-sm89"
    # nvidia.com/gpu.product labels spell the name with dashes: the chart derives the same target from them
    assert slug("NVIDIA-H100-80GB-HBM3") == slug(H100.name)
    t = gpu_target(L4)
    assert t == Target("gpu-nvidia-l4-sm89", "gpu", L4) and t.is_gpu and TARGET_PATTERN.fullmatch(t.id)


def test_this_machine_has_a_cpu_target_first() -> None:
    found = detect_targets()
    assert found[0] == cpu_target() and found[0].kind == "cpu"
    assert re.fullmatch(r"cpu-[a-z0-9_]+-[a-z0-9-]+", found[0].id)
    assert len({t.id for t in found}) == len(found)


def test_what_a_worker_may_advertise() -> None:
    cpu = Target("cpu-x86_64-avx2", "cpu")
    have = [cpu, gpu_target(H100)]
    assert resolve_targets("auto", have) == have
    assert resolve_targets("", have) == have
    assert resolve_targets("none", have) == []
    assert resolve_targets(" gpu-nvidia-h100-80gb-hbm3-sm90 ", have) == [have[1]]
    assert resolve_targets("cpu-x86_64-avx2,cpu-x86_64-avx2", have) == [cpu]
    with pytest.raises(ValueError, match="has no target 'gpu-nvidia-l4-sm89'"):
        resolve_targets("gpu-nvidia-l4-sm89", have)  # a worker must not build for hardware it lacks
    with pytest.raises(ValueError, match="not a build target"):
        resolve_targets("h100", have)
