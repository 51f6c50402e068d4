//! The `regmirror` command: `serve` and `check-config`.

use clap::{Parser, Subcommand};
use regmirror::{app::App, config::Config, server, shutdown, telemetry};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    version,
    about = "A pull-through caching mirror for OCI / Docker registries"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mirror (without --config: a Docker Hub mirror on 0.0.0.0:5000, cache in ./regmirror-data).
    Serve {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Log one JSON object per line instead of text.
        #[arg(long)]
        log_json: bool,
    },
    /// Validate a configuration file and print the effective configuration (secrets redacted).
    CheckConfig {
        /// TOML configuration file (the embedded default when absent).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn load(path: Option<&PathBuf>) -> Result<Config, String> {
    match path {
        Some(path) => Config::load(path).map_err(|e| e.to_string()),
        None => Ok(Config::default()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match load(config.as_ref()) {
            Ok(config) => {
                print!("{}", config.to_redacted_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config, log_json } => {
            telemetry::init(log_json);
            let config = match load(config.as_ref()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!("invalid configuration: {e}");
                    return ExitCode::from(2);
                }
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            match runtime.block_on(serve(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn serve(config: Config) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.server.listen))?;
    let grace = config.server.shutdown_grace;
    let app = App::new(config).map_err(|e| format!("cannot open the cache directory: {e}"))?;
    let registries: Vec<&str> = app.routes().iter().map(|r| r.name.as_str()).collect();
    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        cache = %app.config().cache.dir.display(),
        registries = ?registries,
        "regmirror serving"
    );
    server::run(listener, app, shutdown::signal(), grace).await;
    Ok(())
}
