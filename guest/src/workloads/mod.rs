//! Workloads, chosen by `workload=NAME`. Each prints one `RESULT` line.

use crate::{println, Boot};

mod blk_bench;
mod blk_verify;
mod disks;
mod fault;
mod idle;
mod info;
mod kick_bench;
mod net_common;
mod net_echo;
mod net_rx;
mod net_tx;

/// Runs the workload the command line names; true if it succeeded.
pub fn run(boot: &Boot) -> bool {
    let name = boot.cmdline.get_or("workload", "info");
    match name {
        "info" => info::run(boot),
        "fault" => fault::run(),
        "idle" => idle::run(boot),
        "exception" => fault::run_exception(boot),
        "stack-overflow" => fault::run_stack_overflow(),
        "blk-verify" => blk_verify::run(boot),
        "blk-bench" => blk_bench::run(boot),
        "kick-bench" => kick_bench::run(boot),
        "net-echo" => net_echo::run(boot),
        "net-tx" => net_tx::run(boot),
        "net-rx" => net_rx::run(boot),
        other => {
            println!(
                "RESULT workload={} status=fail reason=unknown-workload",
                other
            );
            false
        }
    }
}
