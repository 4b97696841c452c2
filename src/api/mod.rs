//! The control API (`kickvm run --api-socket PATH`): HTTP/1.1 with JSON bodies on a unix
//! socket, with cloud-hypervisor's paths.
//!
//! | request | answer |
//! | --- | --- |
//! | `GET /api/v1/vm.info` | 200: run state, vCPUs, memory, devices and each queue's notify mode and why |
//! | `GET /api/v1/vm.counters` | 200: per-vCPU exits by reason, per-queue kicks, requests, bytes, interrupts |
//! | `PUT /api/v1/vm.pause` | 204 once the VM is quiescent; 409 if already paused |
//! | `PUT /api/v1/vm.resume` | 204; 409 if not paused |
//! | `PUT /api/v1/vm.shutdown` [`{"timeout_secs": N}`] | 202: the ACPI power button is pressed (the guest shuts down and powers off; exit 0); with `timeout_secs`, a guest still running N s later is paused (in-flight I/O completes) and ended; 409 if paused |
//! | `PUT /api/v1/vm.kill` | 204: the VM ends at once (exit 0) |
//! | `PUT /api/v1/vm.snapshot` `{"destination_url": "file:///DIR"}` | 204 once DIR holds a snapshot of the paused VM (`kickvm run <same options> --restore DIR` continues it); 409 if running; 400 if a device cannot be saved (vhost-user) |
//! | `PUT /api/v1/vm.device-ioeventfd` `{"id": "disk0", "ioeventfd": "on"\|"off"}` | 200: the device's info |
//!
//! Errors are `{"error": "..."}` with 400 (malformed request or body), 404 (unknown path or
//! device), 405 (wrong method), 409 (wrong run state), 413 (too large), 501 (chunked body);
//! none of them changes anything.
//!
//! - [`http`]: the HTTP/1.1 request parser and response writer (server and client).
//! - [`server`]: the socket, its thread, routing.
//! - [`control`]: the main thread's side: run state, pause/resume, reports.

pub mod control;
pub mod http;
pub mod server;

pub use control::{RunControl, RunState, VmView};
pub use server::{ApiResponse, ApiServer, ApiSocketError, PendingRequest, VmAction};
