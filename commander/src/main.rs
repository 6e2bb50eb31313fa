//! The `commander` binary: parse arguments, run, exit with a status.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = fleet_commander::cli::Cli::parse();
    fleet_commander::cli::run(cli)
}
