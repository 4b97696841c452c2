//! The architectural state a vCPU starts with: CPUID (per-vCPU APIC ids and topology), MSRs,
//! registers for the chosen boot entry, FPU, and the LAPIC's LINT0/LINT1 wiring.

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::boot::BootEntry;
use super::layout;
use super::memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("vCPU {vcpu}: {what} failed: {source}")]
    Setup {
        vcpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot write boot page tables or GDT: {0}")]
    WriteGuest(vm_memory::GuestMemoryError),
}

/// The CPU features shown to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuModel {
    /// Everything KVM_GET_SUPPORTED_CPUID offers.
    Host,
    /// Host minus what the PVM CPL0 emulator cannot execute.
    PvmSafe,
}

/// Whether the host KVM is kvm_pvm (guest CPL0 emulated in software).
pub fn host_is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Kernel command-line options given to Linux guests under the pvm-safe model. This PVM
/// applies KVM_SET_CPUID2 only to the bits KVM_GET_SUPPORTED_CPUID reports; every other bit
/// reaches the guest as the host has it (measured: XSAVE, AVX, RDRAND, SMAP stay visible
/// whatever the table says). So what cannot be hidden through CPUID is switched off in the
/// kernel the supported way, with its own options:
/// - `noxsave`: Linux otherwise restores FPU state with `xrstor`, which the CPL0 emulator
///   rejects ("emulation failure"); without XSAVE it also drops AVX and friends.
/// - `clearcpuid=...`: instructions Linux patches into its own CPL0 code when the CPU has
///   them (alternatives): `popcnt` in hweight (seen failing), and, by the same mechanism,
///   rdpid, rdtscp, wrgsbase (fsgsbase), stac/clac (smap), rdpkru (pku), invpcid, and
///   cmpxchg16b (cx16); and `ssse3`, which selects Linux's SIMD BLAKE2s (the entropy pool's
///   hash) whose `kernel_fpu_begin` runs `ldmxcsr`, rejected by the emulator (seen failing
///   while the initramfs is unpacked).
pub const PVM_LINUX_KERNEL_ARGS: &[&str] = &[
    "noxsave",
    "clearcpuid=popcnt,cx16,fsgsbase,rdpid,rdtscp,pku,smap,invpcid,pcid,ssse3",
];

/// (leaf, subleaf or None for all, register, bit, name): features the PVM emulator cannot run
/// at guest CPL0, or that Linux then uses at CPL0 (XSAVE-managed state, AVX/AVX-512 code in
/// crypto and RAID, cmpxchg16b, rdpid/rdpkru/wrgsbase/invpcid/stac in entry and context-switch
/// paths, 5-level paging).
const PVM_HIDDEN: &[(u32, Option<u32>, Reg, u32, &str)] = &[
    (1, None, Reg::Ecx, 1, "pclmulqdq"),
    (1, None, Reg::Ecx, 9, "ssse3"),
    (1, None, Reg::Ecx, 12, "fma"),
    (1, None, Reg::Ecx, 13, "cmpxchg16b"),
    (1, None, Reg::Ecx, 17, "pcid"),
    (1, None, Reg::Ecx, 19, "sse4.1"),
    (1, None, Reg::Ecx, 20, "sse4.2"),
    (1, None, Reg::Ecx, 22, "movbe"),
    (1, None, Reg::Ecx, 23, "popcnt"),
    (1, None, Reg::Ecx, 25, "aes"),
    (1, None, Reg::Ecx, 26, "xsave"),
    (1, None, Reg::Ecx, 27, "osxsave"),
    (1, None, Reg::Ecx, 28, "avx"),
    (1, None, Reg::Ecx, 29, "f16c"),
    (1, None, Reg::Ecx, 30, "rdrand"),
    (7, Some(0), Reg::Ebx, 0, "fsgsbase"),
    (7, Some(0), Reg::Ebx, 3, "bmi1"),
    (7, Some(0), Reg::Ebx, 5, "avx2"),
    (7, Some(0), Reg::Ebx, 8, "bmi2"),
    (7, Some(0), Reg::Ebx, 10, "invpcid"),
    (7, Some(0), Reg::Ebx, 16, "avx512f"),
    (7, Some(0), Reg::Ebx, 17, "avx512dq"),
    (7, Some(0), Reg::Ebx, 18, "rdseed"),
    (7, Some(0), Reg::Ebx, 19, "adx"),
    (7, Some(0), Reg::Ebx, 20, "smap"),
    (7, Some(0), Reg::Ebx, 21, "avx512ifma"),
    (7, Some(0), Reg::Ebx, 26, "avx512pf"),
    (7, Some(0), Reg::Ebx, 27, "avx512er"),
    (7, Some(0), Reg::Ebx, 28, "avx512cd"),
    (7, Some(0), Reg::Ebx, 29, "sha"),
    (7, Some(0), Reg::Ebx, 30, "avx512bw"),
    (7, Some(0), Reg::Ebx, 31, "avx512vl"),
    (7, Some(0), Reg::Ecx, 1, "avx512vbmi"),
    (7, Some(0), Reg::Ecx, 3, "pku"),
    (7, Some(0), Reg::Ecx, 4, "ospke"),
    (7, Some(0), Reg::Ecx, 6, "avx512vbmi2"),
    (7, Some(0), Reg::Ecx, 8, "gfni"),
    (7, Some(0), Reg::Ecx, 9, "vaes"),
    (7, Some(0), Reg::Ecx, 10, "vpclmulqdq"),
    (7, Some(0), Reg::Ecx, 11, "avx512vnni"),
    (7, Some(0), Reg::Ecx, 12, "avx512bitalg"),
    (7, Some(0), Reg::Ecx, 14, "avx512vpopcntdq"),
    (7, Some(0), Reg::Ecx, 16, "la57"),
    (7, Some(0), Reg::Ecx, 22, "rdpid"),
    (7, Some(0), Reg::Edx, 2, "avx512_4vnniw"),
    (7, Some(0), Reg::Edx, 3, "avx512_4fmaps"),
    (7, Some(0), Reg::Edx, 8, "avx512_vp2intersect"),
    (7, Some(0), Reg::Edx, 22, "amx_bf16"),
    (7, Some(0), Reg::Edx, 23, "avx512_fp16"),
    (7, Some(0), Reg::Edx, 24, "amx_tile"),
    (7, Some(0), Reg::Edx, 25, "amx_int8"),
    (7, Some(1), Reg::Eax, 4, "avx_vnni"),
    (7, Some(1), Reg::Eax, 5, "avx512_bf16"),
    (0x8000_0001, None, Reg::Ecx, 6, "sse4a"),
    (0x8000_0001, None, Reg::Ecx, 11, "xop"),
    (0x8000_0001, None, Reg::Ecx, 16, "fma4"),
    (0x8000_0001, None, Reg::Ecx, 21, "tbm"),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

const LEAF_XSAVE: u32 = 0xd;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZE_IDENTIFIERS: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
const CPUID_1_EDX_HTT: u32 = 1 << 28;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// The CPUID shared by all vCPUs (before the per-vCPU ids are filled in). `tsc_khz`, when
/// known, is published in the hypervisor timing leaf 0x40000010 so guests need not calibrate.
pub fn base_cpuid(kvm: &Kvm, model: CpuModel, tsc_khz: Option<u32>) -> Result<CpuId, CpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuError::SupportedCpuid)?;
    if let Some(khz) = tsc_khz {
        cpuid = with_timing_leaf(&cpuid, khz);
    }
    for e in cpuid.as_slice() {
        log::trace!(
            "KVM CPUID {:#010x}.{}: eax={:#010x} ebx={:#010x} ecx={:#010x} edx={:#010x}",
            e.function,
            e.index,
            e.eax,
            e.ebx,
            e.ecx,
            e.edx
        );
    }
    if model == CpuModel::PvmSafe {
        let hidden = hide_pvm_unsafe_features(&mut cpuid);
        if hidden.is_empty() {
            log::info!("pvm-safe CPU model: KVM offered none of the features PVM cannot run");
        } else {
            log::info!(
                "pvm-safe CPU model: hiding {} from the guest",
                hidden.join(" ")
            );
        }
    }
    Ok(cpuid)
}

fn reg_mut(entry: &mut kvm_bindings::kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

/// Clears the PVM-unsafe feature bits and the XSAVE leaf; returns the names of the features
/// that were present and are now hidden.
fn hide_pvm_unsafe_features(cpuid: &mut CpuId) -> Vec<&'static str> {
    let mut hidden = Vec::new();
    for entry in cpuid.as_mut_slice() {
        for &(leaf, subleaf, reg, bit, name) in PVM_HIDDEN {
            if entry.function == leaf && subleaf.is_none_or(|s| s == entry.index) {
                let value = reg_mut(entry, reg);
                if *value & (1 << bit) != 0 {
                    *value &= !(1 << bit);
                    if !hidden.contains(&name) {
                        hidden.push(name);
                    }
                }
            }
        }
        if entry.function == LEAF_XSAVE {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
    }
    hidden
}

const LEAF_HYPERVISOR_BASE: u32 = 0x4000_0000;
const LEAF_HYPERVISOR_TIMING: u32 = 0x4000_0010;
/// The LAPIC timer of KVM's in-kernel LAPIC counts at 1 GHz.
const KVM_APIC_BUS_KHZ: u32 = 1_000_000;

/// Adds leaf 0x40000010 (EAX = TSC kHz, EBX = APIC bus kHz), raising the hypervisor's
/// maximum leaf to reach it. Without a hypervisor base leaf nothing is added.
fn with_timing_leaf(cpuid: &CpuId, tsc_khz: u32) -> CpuId {
    let mut entries: Vec<kvm_bindings::kvm_cpuid_entry2> = cpuid
        .as_slice()
        .iter()
        .filter(|e| e.function != LEAF_HYPERVISOR_TIMING)
        .copied()
        .collect();
    let Some(base) = entries
        .iter_mut()
        .find(|e| e.function == LEAF_HYPERVISOR_BASE)
    else {
        return cpuid.clone();
    };
    base.eax = base.eax.max(LEAF_HYPERVISOR_TIMING);
    entries.push(kvm_bindings::kvm_cpuid_entry2 {
        function: LEAF_HYPERVISOR_TIMING,
        eax: tsc_khz,
        ebx: KVM_APIC_BUS_KHZ,
        ..Default::default()
    });
    CpuId::from_entries(&entries).unwrap_or_else(|_| cpuid.clone())
}

/// Bits needed to number `count` items (the APIC-id shift of a topology level).
fn id_bits(count: u32) -> u32 {
    count.next_power_of_two().trailing_zeros()
}

/// Fills in what differs between vCPUs: the APIC id and the topology (one socket, `cpus`
/// cores, one thread each), and marks the CPU as running under a hypervisor.
pub fn cpuid_for_vcpu(base: &CpuId, apic_id: u8, cpus: u8) -> CpuId {
    let mut cpuid = base.clone();
    let apic_id = u32::from(apic_id);
    let cpus = u32::from(cpus);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (cpus << 16) | (apic_id << 24);
                entry.ecx |= CPUID_1_ECX_HYPERVISOR;
                if cpus > 1 {
                    entry.edx |= CPUID_1_EDX_HTT;
                } else {
                    entry.edx &= !CPUID_1_EDX_HTT;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (TOPOLOGY_LEVEL_SMT << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = id_bits(cpus);
                        entry.ebx = cpus;
                        entry.ecx = (TOPOLOGY_LEVEL_CORE << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            LEAF_AMD_SIZE_IDENTIFIERS => {
                entry.ecx = (entry.ecx & !0xf0ff) | (id_bits(cpus) << 12) | (cpus - 1);
            }
            LEAF_AMD_EXT_APIC_ID => {
                entry.eax = apic_id;
                entry.ebx = apic_id & 0xff; // compute unit id, one thread per unit
                entry.ecx = 0; // node 0, one node
            }
            _ => {}
        }
    }
    cpuid
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Writes the GDT (and for the Linux entry, the identity-mapped page tables) that the boot
/// vCPU's registers refer to.
pub fn write_boot_tables(mem: &GuestMemoryMmap, entry: &BootEntry) -> Result<(), CpuError> {
    let gdt = boot_gdt(entry);
    for (i, descriptor) in gdt.iter().enumerate() {
        mem.write_obj(
            *descriptor,
            GuestAddress(layout::BOOT_GDT_START + 8 * i as u64),
        )
        .map_err(CpuError::WriteGuest)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(CpuError::WriteGuest)?;
    if let BootEntry::Linux64 { .. } = entry {
        write_identity_map(mem)?;
    }
    Ok(())
}

/// PML4 -> PDPT -> PD_COUNT page directories of 2 MiB pages: the first 4 GiB identity-mapped.
fn write_identity_map(mem: &GuestMemoryMmap) -> Result<(), CpuError> {
    const PRESENT_WRITABLE: u64 = 0x3;
    const HUGE_PAGE: u64 = 0x80;
    mem.write_obj(
        layout::PDPT_START | PRESENT_WRITABLE,
        GuestAddress(layout::PML4_START),
    )
    .map_err(CpuError::WriteGuest)?;
    let mut directory = [0u8; 4096];
    for pd_index in 0..layout::PD_COUNT {
        let pd_addr = layout::PD_START + pd_index * 0x1000;
        mem.write_obj(
            pd_addr | PRESENT_WRITABLE,
            GuestAddress(layout::PDPT_START + pd_index * 8),
        )
        .map_err(CpuError::WriteGuest)?;
        for (i, slot) in directory.chunks_exact_mut(8).enumerate() {
            let page = ((pd_index << 9) + i as u64) << 21;
            slot.copy_from_slice(&(page | PRESENT_WRITABLE | HUGE_PAGE).to_le_bytes());
        }
        mem.write_slice(&directory, GuestAddress(pd_addr))
            .map_err(CpuError::WriteGuest)?;
    }
    Ok(())
}

/// A GDT descriptor from (flags, base, limit), flags in the "access | flags << 12" form.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

const GDT_CODE64: u16 = 0xa09b;
const GDT_CODE32: u16 = 0xc09b;
const GDT_DATA: u16 = 0xc093;
const GDT_TSS: u16 = 0x808b;
const CODE_SELECTOR_INDEX: usize = 1;
const DATA_SELECTOR_INDEX: usize = 2;
const TSS_SELECTOR_INDEX: usize = 3;

fn boot_gdt(entry: &BootEntry) -> [u64; 4] {
    let code = match entry {
        BootEntry::Pvh { .. } => GDT_CODE32,
        BootEntry::Linux64 { .. } => GDT_CODE64,
    };
    [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(GDT_DATA, 0, 0xfffff),
        gdt_entry(GDT_TSS, 0, 0xfffff),
    ]
}

fn segment_from_gdt(descriptor: u64, index: usize) -> kvm_segment {
    let limit = ((descriptor & 0xffff) | ((descriptor >> 32) & 0xf_0000)) as u32;
    let granularity = ((descriptor >> 55) & 1) as u8;
    kvm_segment {
        base: ((descriptor >> 16) & 0xff_ffff) | ((descriptor >> 32) & 0xff00_0000),
        limit: if granularity == 1 {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector: (index * 8) as u16,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present: ((descriptor >> 47) & 1) as u8,
        dpl: ((descriptor >> 45) & 3) as u8,
        db: ((descriptor >> 54) & 1) as u8,
        s: ((descriptor >> 44) & 1) as u8,
        l: ((descriptor >> 53) & 1) as u8,
        g: granularity,
        avl: ((descriptor >> 52) & 1) as u8,
        unusable: if (descriptor >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

fn boot_sregs(mut sregs: kvm_sregs, entry: &BootEntry) -> kvm_sregs {
    let gdt = boot_gdt(entry);
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 7;
    let code = segment_from_gdt(gdt[CODE_SELECTOR_INDEX], CODE_SELECTOR_INDEX);
    let data = segment_from_gdt(gdt[DATA_SELECTOR_INDEX], DATA_SELECTOR_INDEX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[TSS_SELECTOR_INDEX], TSS_SELECTOR_INDEX);
    match entry {
        BootEntry::Pvh { .. } => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64 { .. } => {
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    sregs
}

fn boot_regs(entry: &BootEntry) -> kvm_regs {
    const RFLAGS_RESERVED_BIT1: u64 = 0x2;
    match *entry {
        BootEntry::Pvh { entry, start_info } => kvm_regs {
            rip: entry,
            rbx: start_info,
            rflags: RFLAGS_RESERVED_BIT1,
            ..Default::default()
        },
        BootEntry::Linux64 { entry, boot_params } => kvm_regs {
            rip: entry,
            rsp: layout::BOOT_STACK_POINTER,
            rbp: layout::BOOT_STACK_POINTER,
            rsi: boot_params,
            rflags: RFLAGS_RESERVED_BIT1,
            ..Default::default()
        },
    }
}

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_lvt_delivery_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut bytes = [0u8; 4];
    for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
        *b = *r as u8;
    }
    let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
    for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
        *r = b as std::os::raw::c_char;
    }
}

/// Configures one vCPU: CPUID, MSRs, FPU and LAPIC for all; registers only for the boot vCPU
/// (the others wait for INIT/SIPI from the guest in the in-kernel LAPIC).
/// The CPUID a vCPU shows its guest: all a restored vCPU needs before its saved state is
/// loaded (CPUID is not part of a snapshot; the same options give the same).
pub fn set_cpuid(vcpu: &VcpuFd, index: u8, cpus: u8, base_cpuid: &CpuId) -> Result<(), CpuError> {
    vcpu.set_cpuid2(&cpuid_for_vcpu(base_cpuid, index, cpus))
        .map_err(|source| CpuError::Setup {
            vcpu: index,
            what: "KVM_SET_CPUID2",
            source,
        })
}

pub fn configure_vcpu(
    vcpu: &VcpuFd,
    index: u8,
    cpus: u8,
    base_cpuid: &CpuId,
    entry: &BootEntry,
) -> Result<(), CpuError> {
    let setup = |what| {
        move |source| CpuError::Setup {
            vcpu: index,
            what,
            source,
        }
    };
    set_cpuid(vcpu, index, cpus, base_cpuid)?;

    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).expect("the boot MSR list fits a kvm_msrs");
    let set = vcpu.set_msrs(&msrs).map_err(setup("KVM_SET_MSRS"))?;
    if set != entries.len() {
        log::warn!(
            "vCPU {index}: KVM accepted {set} of {} boot MSRs; MSR {:#x} was refused",
            entries.len(),
            entries[set].index
        );
    }

    let mut lapic = vcpu.get_lapic().map_err(setup("KVM_GET_LAPIC"))?;
    set_lvt_delivery_mode(&mut lapic.regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
    set_lvt_delivery_mode(&mut lapic.regs, APIC_LVT_LINT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(setup("KVM_SET_LAPIC"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(setup("KVM_SET_FPU"))?;

    if index == 0 {
        let sregs = vcpu.get_sregs().map_err(setup("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&boot_sregs(sregs, entry))
            .map_err(setup("KVM_SET_SREGS"))?;
        vcpu.set_regs(&boot_regs(entry))
            .map_err(setup("KVM_SET_REGS"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn cpuid_with(entries: &[kvm_cpuid_entry2]) -> CpuId {
        CpuId::from_entries(entries).unwrap()
    }

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment_from_gdt(gdt_entry(GDT_CODE64, 0, 0xfffff), 1);
        assert_eq!((code.base, code.limit, code.selector), (0, 0xffff_ffff, 8));
        assert_eq!((code.l, code.db, code.type_, code.present), (1, 0, 0xb, 1));
        let code32 = segment_from_gdt(gdt_entry(GDT_CODE32, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db), (0, 1));
        let data = segment_from_gdt(gdt_entry(GDT_DATA, 0, 0xfffff), 2);
        assert_eq!((data.type_, data.s, data.unusable), (3, 1, 0));
    }

    #[test]
    fn each_vcpu_gets_its_apic_id_and_the_cpu_count() {
        let base = cpuid_with(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0000_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_EXT_TOPOLOGY,
                index: 1,
                ..Default::default()
            },
        ]);
        let cpuid = cpuid_for_vcpu(&base, 3, 4);
        let leaf1 = cpuid.as_slice()[0];
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800);
        assert_ne!(leaf1.ecx & CPUID_1_ECX_HYPERVISOR, 0);
        let topo = cpuid.as_slice()[1];
        assert_eq!((topo.eax, topo.ebx, topo.edx), (2, 4, 3));
        assert_eq!(topo.ecx >> 8, TOPOLOGY_LEVEL_CORE);
    }

    #[test]
    fn pvm_safe_hides_xsave_avx_and_cmpxchg16b() {
        let mut cpuid = cpuid_with(&[
            kvm_cpuid_entry2 {
                function: 1,
                ecx: (1 << 26) | (1 << 28) | (1 << 13) | 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: 1 << 5,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: LEAF_XSAVE,
                eax: 7,
                ..Default::default()
            },
        ]);
        let hidden = hide_pvm_unsafe_features(&mut cpuid);
        assert_eq!(cpuid.as_slice()[0].ecx, 1, "SSE3 stays");
        assert_eq!(cpuid.as_slice()[1].ebx, 0);
        assert_eq!(cpuid.as_slice()[2].eax, 0);
        for name in ["xsave", "avx", "cmpxchg16b", "avx2"] {
            assert!(hidden.contains(&name), "{name} not reported");
        }
    }

    #[test]
    fn timing_leaf_is_added_under_the_hypervisor_base_leaf() {
        let base = cpuid_with(&[kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR_BASE,
            eax: 0x4000_0001,
            ..Default::default()
        }]);
        let cpuid = with_timing_leaf(&base, 2_500_000);
        let entries = cpuid.as_slice();
        assert_eq!(entries[0].eax, LEAF_HYPERVISOR_TIMING);
        assert_eq!(entries[1].function, LEAF_HYPERVISOR_TIMING);
        assert_eq!(entries[1].eax, 2_500_000);
        let no_hypervisor = cpuid_with(&[kvm_cpuid_entry2::default()]);
        assert_eq!(with_timing_leaf(&no_hypervisor, 1).as_slice().len(), 1);
    }

    #[test]
    fn lvt_delivery_mode_keeps_other_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT_LINT0] = 0x10u8 as std::os::raw::c_char;
        regs[APIC_LVT_LINT0 + 1] = 0x01;
        regs[APIC_LVT_LINT0 + 2] = 0x01;
        set_lvt_delivery_mode(&mut regs, APIC_LVT_LINT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT_LINT0] as u8, 0x10);
        assert_eq!(regs[APIC_LVT_LINT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT_LINT0 + 2] as u8, 0x01);
    }
}
