//! The `usher` binary: parses the command line, loads the configuration,
//! sets up logging and runs the chosen command.

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use usher::cli::{self, Cli, Command};
use usher::config::Config;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("usher: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if let Command::CheckConfig = cli.command {
        if let Err(e) = usher::server::Keys::load(&config) {
            eprintln!("usher: {e:#}");
            return std::process::ExitCode::from(2);
        }
        println!("{}: ok", cli.config.display());
        return std::process::ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in log files.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { ready_file } => {
                usher::server::run(config, ready_file.as_deref()).await
            }
            other => cli::run(&config, other).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usher: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit on open files to the hard limit: every proxied
/// session holds two sockets, and the soft limit (often 1,024) would cap a
/// server at a few hundred idle IMAP clients long before memory does.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    let raised = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 || limit.rlim_cur >= limit.rlim_max
        {
            return;
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
    };
    if !raised {
        eprintln!(
            "usher: could not raise the open-file limit to {}",
            limit.rlim_max
        );
    }
}
