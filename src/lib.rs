//! kickvm: a KVM virtual machine monitor for x86-64 built around fast userspace virtio I/O.
//!
//! - [`cli`]: the command line and [`cli::VmConfig`].
//! - [`vmm`]: the VM lifecycle (memory, boot, vCPU threads, the run loop) and its layout.
//! - [`devices`]: legacy platform devices (serial, i8042, ACPI power-off).
//! - [`api`]: the control API server (`--api-socket`); [`remote`]: its client.

pub mod api;
pub mod cli;
pub mod devices;
pub mod remote;
pub mod vmm;
