"""crosslib.machine: which CPUs multiply bf16 natively (the chapters' dictionaries use bf16 only there)."""

from crosslib.machine import cpu_flags, machine_description, native_bf16


def test_native_bf16_needs_the_instructions_and_no_cap_below_them():
    assert native_bf16({"avx2", "avx512f", "avx512_bf16"}, "")
    assert native_bf16({"avx2", "amx_bf16", "amx_tile"}, "avx512_core_amx")  # oneDNN's values, any case
    assert native_bf16({"avx512_bf16"}, "ALL")
    assert not native_bf16({"avx2", "fma"}, "")  # an AVX2-only laptop: emulated bf16, 7-12x slower than fp32
    assert not native_bf16({"avx512f", "avx512_bf16"}, "AVX2")  # capped below AVX-512-BF16
    assert not native_bf16({"avx512f", "avx512_bf16"}, "AVX512_CORE")


def test_this_machine(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not native_bf16()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    flags = cpu_flags()
    assert native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    machine = machine_description()
    assert machine["avx512_bf16"] == ("avx512_bf16" in flags) and machine["threads"] >= 1
