//! The `commander` binary: parse arguments, run, exit with a status.

use std::process::ExitCode;

use clap::Parser;

/// Ingest decodes, normalises and drops millions of small strings and vectors a second;
/// glibc's allocator spent half of `bench ingest` in malloc and free (and consolidating
/// its free lists). mimalloc's per-thread free lists do the same work in a fraction.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    small_pages_only();
    let cli = fleet_commander::cli::Cli::parse();
    fleet_commander::cli::run(cli)
}

/// Turns transparent huge pages off for this process, unless `MIMALLOC_ALLOW_THP` says
/// otherwise (mimalloc reads it). mimalloc asks for huge pages on its arenas and gives
/// back to the system what it has not used for a second, so on the task path a page taken
/// again cost the kernel zeroing a whole 2 MiB huge page: `clear_page_erms` was 15 % of
/// the commander's CPU in `fleet-sim bench dispatch`. With huge pages off, the same bench
/// measured 4-9 % less CPU per task and 10-20 % less resident memory.
fn small_pages_only() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // Refused only by kernels older than 3.15; huge pages then stay as they were.
        let _ = nix::sys::prctl::set_thp_disable(true);
    }
}
