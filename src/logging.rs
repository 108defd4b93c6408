//! Logging setup: `tracing` to stderr, plain lines by default (journald adds its own
//! timestamps), JSON on request. `SNAPVEIL_LOG` overrides the filter (EnvFilter syntax).

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

pub fn init(format: LogFormat, verbose: u8) {
    let default = match verbose {
        0 => "snapveil=info",
        1 => "snapveil=debug",
        _ => "snapveil=trace",
    };
    let filter =
        EnvFilter::try_from_env("SNAPVEIL_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    // Colour only on a terminal: journald and log files get plain lines.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A log line that cannot be written is dropped, not reported with eprintln!,
        // which panics: stderr is the ssh channel of `serve-pull`, and a server that
        // drops the connection must not cut the pull's cleanup short.
        .log_internal_errors(false)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Plain => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!("panic: {info}");
        prev(info);
    }));
}
