#![forbid(unsafe_code)]

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        // `kubectl logs` shows a Pod's log as written: no colour codes
        // outside a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    sandfork_operator::run::run(sandfork_operator::run::Args::parse()).await?;
    Ok(())
}
