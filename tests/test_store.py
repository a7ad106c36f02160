"""Shared infrastructure: atomic writes leave no partial file, and the host's CPU is described for speed claims."""

from pocketformer import store


def test_atomic_json_write_leaves_only_the_final_file(tmp_path):
    store.write_json(tmp_path / "a" / "r.json", {"x": 1})
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["r.json"]
    assert (tmp_path / "a" / "r.json").read_text().strip().startswith("{")


def test_cpu_names_a_model_and_only_known_features():
    info = store.cpu()
    assert info["model"] and set(info["features"]) <= set(store.CPU_FEATURES)
    assert info["features"] == [f for f in store.CPU_FEATURES if f in info["features"]]  # in the listed order


# -- CPU fingerprints: the kernel-deciding features, parsed from real /proc/cpuinfo texts ---------------------------

HASWELL = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU E5-2680 v3 @ 2.50GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht \
syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology cpuid pni pclmulqdq ssse3 fma cx16 pcid sse4_1 \
sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm fsgsbase bmi1 avx2 smep bmi2 erms invpcid

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU E5-2680 v3 @ 2.50GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep fma sse4_2 avx f16c avx2 bmi2
"""

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model name\t: AMD EPYC 9R14
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht \
syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid aperfmperf pni \
pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm \
cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch topoext perfctr_core invpcid_single ssbd ibrs ibpb stibp \
vmmcall fsgsbase bmi1 avx2 smep bmi2 invpcid avx512f avx512dq rdseed adx smap avx512ifma clflushopt clwb avx512cd \
sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx512_bf16 clzero xsaveerptr rdpru wbnoinvd arat \
avx512vbmi pku ospke avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm
"""

GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop \
sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd40
CPU revision\t: 1
"""

RPI5 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU part\t: 0xd0b

Revision\t: d04170
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""


def test_an_avx2_only_intel_cpu_has_no_int8_dot_product():
    info = store.parse_cpuinfo(HASWELL, "x86_64")
    assert info["model"] == "Intel(R) Xeon(R) CPU E5-2680 v3 @ 2.50GHz"
    assert info["fingerprint"] == "x86-64 AVX2 FMA"
    assert not store.int8_dot_product(info["features"])


def test_an_epyc_with_avx512_vnni_has_int8_dot_product():
    info = store.parse_cpuinfo(EPYC, "x86_64")
    assert info["fingerprint"] == "x86-64 AVX2 FMA AVX-512 VNNI BF16"
    assert info["features"] == ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]
    assert store.int8_dot_product(info["features"])


def test_arm64_dot_product_and_int8_matmul_are_named():
    graviton = store.parse_cpuinfo(GRAVITON3, "aarch64")
    assert graviton["fingerprint"] == "arm64 dotprod i8mm bf16 sve"
    assert graviton["model"] == "aarch64"  # arm64 cpuinfo names no model; the machine stands in
    assert store.int8_dot_product(graviton["features"])
    rpi = store.parse_cpuinfo(RPI5, "aarch64")
    assert (rpi["model"], rpi["fingerprint"]) == ("Raspberry Pi 5 Model B Rev 1.0", "arm64 dotprod")
    assert store.int8_dot_product(rpi["features"])


def test_avx_vnni_and_amx_count_as_int8_dot_products():
    alder_lake = HASWELL.replace("bmi2 erms", "bmi2 erms avx_vnni")
    assert store.parse_cpuinfo(alder_lake, "x86_64")["fingerprint"] == "x86-64 AVX2 FMA VNNI"
    assert store.int8_dot_product(["avx2", "avx_vnni"])
    sapphire = EPYC.replace("fsrm", "fsrm amx_bf16 amx_tile amx_int8")
    assert store.parse_cpuinfo(sapphire, "x86_64")["fingerprint"] == "x86-64 AVX2 FMA AVX-512 VNNI BF16 AMX"
    assert store.int8_dot_product(["amx_int8"]) and not store.int8_dot_product(["avx2", "fma", "avx512f"])


def test_a_cpu_whose_features_cannot_be_read_does_not_pass_for_a_plain_one():
    assert store.parse_cpuinfo("", "x86_64")["fingerprint"] == "x86-64 (CPU features not detected)"


def test_this_hosts_fingerprint_names_its_architecture():
    import platform

    assert store.fingerprint() == store.cpu()["fingerprint"]
    assert store.fingerprint().startswith(store.arch_name(platform.machine()))


def test_a_cpu_recorded_before_fingerprints_is_fingerprinted_from_its_features():
    old = {"model": "AMD EPYC", "features": ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]}
    assert store.cpu_text(old, "x86_64") == "AMD EPYC, x86-64 AVX2 FMA AVX-512 VNNI BF16"
    assert store.cpu_text(None, "x86_64") is None


def test_ort_u8s8_kernels_saturate_only_on_x86_without_int8_dot_products():
    assert store.u8s8_saturates(store.parse_cpuinfo(HASWELL, "x86_64"))
    assert not store.u8s8_saturates(store.parse_cpuinfo(EPYC, "x86_64"))
    alder_lake = HASWELL.replace("bmi2 erms", "bmi2 erms avx_vnni")
    assert not store.u8s8_saturates(store.parse_cpuinfo(alder_lake, "x86_64"))
    assert not store.u8s8_saturates(store.parse_cpuinfo(RPI5, "aarch64"))  # ARM's kernels widen before they add
