#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use mcp_session_operator::cli::{self, Cli};

/// The proxy allocates per request on every worker thread; glibc's malloc serialises them on
/// its arena locks (seen in profiles of the proxy benchmark), mimalloc does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // One TLS provider for every client (Kubernetes, Redis); ignore a second install.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cli::error_line(&e));
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
