//! The `commander` binary: parse arguments, run, exit with a status.

use std::process::ExitCode;

use clap::Parser;

/// Ingest decodes, normalises and drops millions of small strings and vectors a second;
/// glibc's allocator spent half of `bench ingest` in malloc and free (and consolidating
/// its free lists). mimalloc's per-thread free lists do the same work in a fraction.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    fleet_commander::cli::small_pages_only();
    let cli = fleet_commander::cli::Cli::parse();
    fleet_commander::cli::run(cli)
}
