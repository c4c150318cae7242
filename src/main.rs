//! The `ltmc` binary: `serve` (the default), `migrate`, `openapi`.

use std::process::ExitCode;

use clap::Parser;
use ltmc::app::App;
use ltmc::config::{Cli, Command, Config};
use ltmc::store::Store;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line naming the setting, exit 2.
            let message = e.to_string();
            eprintln!(
                "{}",
                message.lines().next().unwrap_or("invalid configuration")
            );
            return ExitCode::from(2);
        }
    };
    init_tracing(&cli.config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Openapi => print_openapi(),
            Command::Migrate => Store::migrate(cli.config.sqlite_path()).await.map_err(|e| {
                ServeError::Config(format!(
                    "--database-url / LTMC_DATABASE_URL: cannot migrate {}: {e}",
                    cli.config.sqlite_path()
                ))
            }),
            Command::Serve => serve(cli.config).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(ServeError::Config(line)) => {
            eprintln!("error: {line}");
            ExitCode::from(2)
        }
        Err(ServeError::Failed(e)) => {
            tracing::error!(error = %e, "ltmc failed");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the document. A reader that stops early (`ltmc openapi | head`) is no error: print!
/// would panic on the closed pipe (Rust ignores SIGPIPE), so write and let a broken pipe go.
fn print_openapi() -> Result<(), ServeError> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out
        .write_all(ltmc::openapi::document().as_bytes())
        .and_then(|()| out.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(ServeError::Failed(
            ltmc::error::Error::Internal(format!("writing the document: {e}")),
        )),
        _ => Ok(()),
    }
}

enum ServeError {
    Config(String),
    Failed(ltmc::error::Error),
}

impl From<ltmc::error::Error> for ServeError {
    fn from(e: ltmc::error::Error) -> Self {
        ServeError::Failed(e)
    }
}

async fn serve(config: Config) -> Result<(), ServeError> {
    config.check_exposure().map_err(ServeError::Config)?;
    let shutdown = CancellationToken::new();
    let app = App::build(config, shutdown.clone()).await.map_err(|e| {
        ServeError::Config(
            e.to_string()
                .trim_start_matches("internal error: ")
                .to_owned(),
        )
    })?;
    tokio::spawn(async move {
        stop_signal().await;
        tracing::info!("stop signal received; shutting down");
        shutdown.cancel();
    });
    app.run().await?;
    Ok(())
}

async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn init_tracing(config: &Config) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::new(&config.log);
    // Colour codes only for a person at a terminal: in a file, a pipe or a log collector they
    // are noise that breaks searching.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if config.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
