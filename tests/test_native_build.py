"""The llama.cpp build: native minus AMX, cached per CPU, never a wheel made for another CPU."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import llama_cpp
import pytest

from ktulhu import native_build

SAPPHIRE = """processor\t: 0
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c avx512f avx512_vnni amx_tile amx_int8 amx_bf16 hypervisor constant_tsc
bugs\t\t: spectre_v1
processor\t: 1
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c avx512f avx512_vnni amx_tile amx_int8 amx_bf16 hypervisor constant_tsc
"""
ZEN2 = "flags\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 hypervisor\n"


def test_only_instruction_set_flags_make_the_fingerprint() -> None:
    flags = native_build.cpu_isa_flags(SAPPHIRE)
    assert flags == sorted(flags)
    assert {"avx512f", "amx_tile", "sse4_2"} <= set(flags)
    assert "hypervisor" not in flags and "constant_tsc" not in flags and "fpu" not in flags
    assert native_build.cpu_isa_flags(ZEN2) != flags


def test_every_build_is_native_without_amx_kernels() -> None:
    for gpu in native_build.GPU_VARIANTS:
        args = native_build.cmake_args(gpu)
        assert "-DGGML_NATIVE=ON" in args
        for language in ("C", "CXX"):
            flags = next(a for a in args if a.startswith(f"-DCMAKE_{language}_FLAGS="))
            assert {"-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"} <= set(flags.split("=", 1)[1].split())
        # CMAKE_ARGS travels as one string that scikit-build-core splits like a shell
        assert shlex.split(shlex.join(args)) == args
    assert "-DGGML_CUDA=on" in native_build.cmake_args("cuda")
    with pytest.raises(native_build.BuildError, match="unknown GPU variant"):
        native_build.cmake_args("rocm; rm -rf /")


def test_the_cache_key_changes_with_the_cpu_and_the_variant() -> None:
    sapphire, zen2 = native_build.cpu_isa_flags(SAPPHIRE), native_build.cpu_isa_flags(ZEN2)
    assert native_build.build_key("cpu", sapphire) == native_build.build_key("cpu", list(sapphire))
    assert native_build.build_key("cpu", sapphire) != native_build.build_key("cpu", zen2)
    assert native_build.build_key("cpu", sapphire) != native_build.build_key("cuda", sapphire)


def test_a_wheel_cached_for_another_cpu_is_never_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KTULHU_BUILD_CACHE", str(tmp_path))
    other = tmp_path / "wheels" / native_build.build_key("cpu", native_build.cpu_isa_flags(ZEN2))
    other.mkdir(parents=True)
    (other / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl").write_bytes(b"built for a Zen 2")
    commands: list[list[str]] = []

    def refuse_to_build(command: list[str], *, what: str, env: dict[str, str] | None = None) -> None:
        commands.append(command)
        assert env is not None and env["CMAKE_ARGS"] == shlex.join(native_build.cmake_args("cpu"))
        raise native_build.BuildError("stopped before compiling")

    monkeypatch.setattr(native_build, "_run", refuse_to_build)
    with pytest.raises(native_build.BuildError, match="stopped before compiling"):
        native_build.ensure_wheel("cpu")
    # it went to build its own, with pip's wheel cache off and from source
    assert commands and "--no-cache-dir" in commands[0] and "--no-binary" in commands[0]
    # a wheel under this CPU's key is found without building
    mine = tmp_path / "wheels" / native_build.build_key("cpu")
    mine.mkdir(parents=True)
    (mine / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl").write_bytes(b"built here")
    assert native_build.ensure_wheel("cpu").parent == mine
    assert len(commands) == 1
    assert not list((tmp_path / "wheels").glob("tmp*"))  # a failed build leaves no half directory


def test_this_environment_runs_the_build_made_for_this_cpu() -> None:
    """`make setup` installed the wheel built here: the marker fits this CPU and no AMX kernel is in."""
    marker = native_build.read_marker()
    assert marker is not None, f"no {native_build.MARKER_NAME} in {sys.prefix}: set up with `make setup`"
    assert native_build.fits_this_cpu(marker)
    assert marker["key"] == native_build.build_key(marker["gpu"])
    info = llama_cpp.llama_print_system_info().decode()
    assert "AMX_INT8 = 1" not in info and "AMX = 1" not in info


def test_set_up_is_instant_when_the_build_fits(capsys: pytest.CaptureFixture[str]) -> None:
    assert native_build.install(native_build.read_marker()["gpu"]) is False
    assert native_build.main(["key"]) == 0
    assert capsys.readouterr().out.strip() == native_build.build_key(native_build.read_marker()["gpu"])
