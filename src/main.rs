//! `kickvm run ...`: parse the command line, build and run the VM, turn the outcome into an
//! exit status (0 guest reset/poweroff, 1 run-time failure, 2 usage/config error, 3 guest
//! crash, 128+N stopped by signal N).

use std::io::Write;

use clap::error::ErrorKind;
use clap::Parser;

use kickvm::api::ApiServer;
use kickvm::cli::{Cli, Command, VmConfig};
use kickvm::vmm::exit::VmExitReason;
use kickvm::vmm::Vm;

const EXIT_RUNTIME_FAILURE: i32 = 1;
const EXIT_USAGE: i32 = 2;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_micros()
        .init();
    std::process::exit(real_main());
}

fn real_main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return report_usage_error(e),
    };
    match cli.command {
        Command::Run(args) => run(VmConfig::from(args)),
        Command::Remote(args) => remote(&args.api_socket, args.command.into()),
    }
}

fn remote(socket: &std::path::Path, command: kickvm::remote::RemoteCommand) -> i32 {
    match kickvm::remote::run(socket, &command) {
        Ok(output) => {
            if !output.is_empty() {
                // A closed stdout (`| head`) is the reader's choice, not an error.
                let _ = writeln!(std::io::stdout(), "{}", output.trim_end());
            }
            0
        }
        Err(e) => {
            eprintln!("kickvm: {e}");
            EXIT_RUNTIME_FAILURE
        }
    }
}

fn report_usage_error(e: clap::Error) -> i32 {
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            0
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            EXIT_USAGE
        }
        _ => {
            // clap appends usage and a hint after a blank line; the first paragraph, joined
            // into one line, says it all.
            let rendered = e.render().to_string();
            let message: Vec<&str> = rendered
                .lines()
                .take_while(|line| !line.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("kickvm: {}", message.join(" "));
            EXIT_USAGE
        }
    }
}

fn run(config: VmConfig) -> i32 {
    if config.api_socket.is_none() {
        if let Some(disk) = config.disks.iter().find(|d| d.pause_on_no_space) {
            eprintln!(
                "kickvm: error: --disk {}: enospc=pause needs --api-socket (the VM is resumed \
                 through it once space is freed)",
                disk.path.display()
            );
            return EXIT_USAGE;
        }
    }
    // Bound first: no other thread exists yet (the socket is created under a umask), and a
    // bad path is a usage error before anything is built.
    let api = match config
        .api_socket
        .as_deref()
        .map(ApiServer::bind)
        .transpose()
    {
        Ok(api) => api,
        Err(e) => {
            eprintln!("kickvm: error: {e}");
            return EXIT_USAGE;
        }
    };
    let mut vm = match Vm::new(&config) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("kickvm: error: {e}");
            return if e.is_config_error() {
                EXIT_USAGE
            } else {
                EXIT_RUNTIME_FAILURE
            };
        }
    };
    if let Some(api) = api {
        vm.attach_api(api);
    }
    match vm.run() {
        Ok(reason) => {
            match &reason {
                VmExitReason::Reset => log::info!("guest reset: VM ended"),
                VmExitReason::PowerOff => log::info!("guest powered off: VM ended"),
                VmExitReason::Crashed {
                    vcpu,
                    detail,
                    registers,
                } => eprintln!("kickvm: guest crashed on vCPU {vcpu}: {detail}\n{registers}"),
                VmExitReason::Failed {
                    vcpu,
                    detail,
                    registers,
                } => eprintln!("kickvm: VM failed on vCPU {vcpu}: {detail}\n{registers}"),
                VmExitReason::Signal(signal) => {
                    eprintln!("kickvm: stopped by signal {signal}")
                }
                VmExitReason::ApiShutdown => log::info!("vm.shutdown: grace period over: VM ended"),
                VmExitReason::ApiKill => log::info!("vm.kill: VM ended"),
            }
            reason.exit_code()
        }
        Err(e) => {
            eprintln!("kickvm: error: {e}");
            EXIT_RUNTIME_FAILURE
        }
    }
}
