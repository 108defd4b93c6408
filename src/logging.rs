//! Logging setup: `tracing` to stderr, plain lines by default, JSON on request.
//! `SNAPVEIL_LOG` overrides the filter (EnvFilter syntax). When stderr is the journal
//! (a systemd unit), plain lines carry no timestamp of their own: journald stamps each.

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
        LogFormat::Plain if stderr_is_journal() => {
            builder.with_target(false).without_time().try_init()
        }
        LogFormat::Plain => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!("panic: {info}");
        prev(info);
    }));
}

/// systemd sets `JOURNAL_STREAM=DEV:INODE` for a unit whose stderr goes to the journal;
/// the variable is inherited, so it counts only if stderr is still that stream
/// (`snapveil run >log 2>&1` inside a unit keeps its timestamps).
fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    match nix::sys::stat::fstat(libc::STDERR_FILENO) {
        Ok(st) => dev.parse() == Ok(st.st_dev) && ino.parse() == Ok(st.st_ino),
        Err(_) => false,
    }
}
