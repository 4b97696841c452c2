//! Workloads, chosen by `workload=NAME`. Each prints one `RESULT` line.

use crate::{println, Boot};

mod fault;
mod info;

/// Runs the workload the command line names; true if it succeeded.
pub fn run(boot: &Boot) -> bool {
    let name = boot.cmdline.get_or("workload", "info");
    match name {
        "info" => info::run(boot),
        "fault" => fault::run(),
        "exception" => fault::run_exception(),
        other => {
            println!("RESULT workload={} status=fail reason=unknown-workload", other);
            false
        }
    }
}
