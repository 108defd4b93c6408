//! Hook commands around a job: environment, timeout, output into the log line by line
//! *as it arrives* (stdout and stderr at info: hooks report progress such as "tables
//! locked", and a healthy run must not read like a warning; a failing hook is then said
//! so at warn), and *held* pre-snapshot hooks that keep a lock (e.g. `FLUSH TABLES WITH
//! READ LOCK`, which dies with its session) until the snapshot exists.
//!
//! Held protocol: the hook prints a line `READY` on stdout once it holds; snapveil takes
//! the snapshot and closes the hook's stdin; on EOF the hook releases and exits 0.
//!
//! Every hook is [`Cmd::cancellable`]: SIGTERM to snapveil reaches the hook's process
//! group at once (a 15-minute dump must not hold `systemctl stop` until its timeout), and
//! the hook's error says it was interrupted. Hooks of the run's steps stop on any signal;
//! post-backup and on-failure hooks only on one that arrives while they run, so an
//! on-failure hook still reports an interrupted run.

use crate::config::{Hook, Phase};
use crate::exec::{Cmd, Exit, Line, Output, Runner, RunningChild};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{phase} hook `{cmd}` could not start: {source}")]
    Spawn {
        phase: &'static str,
        cmd: String,
        source: std::io::Error,
    },
    #[error("{phase} hook `{cmd}` failed ({exit})")]
    Failed {
        phase: &'static str,
        cmd: String,
        exit: Exit,
    },
    #[error("{phase} hook `{cmd}` stopped: interrupted by {signal}")]
    Interrupted {
        phase: &'static str,
        cmd: String,
        signal: &'static str,
    },
    #[error("held hook `{cmd}` did not print READY within {secs} s")]
    NotReady { cmd: String, secs: u64 },
    #[error("held hook `{cmd}` exited before READY ({exit})")]
    EndedEarly { cmd: String, exit: Exit },
}

/// Environment passed to every hook of one run.
#[derive(Debug, Clone, Default)]
pub struct HookEnv(pub Vec<(String, String)>);

impl HookEnv {
    pub fn set(&mut self, k: &str, v: impl Into<String>) {
        self.0.retain(|(x, _)| x != k);
        self.0.push((k.to_string(), v.into()));
    }
}

fn cmd_of(hook: &Hook, env: &HookEnv, phase: Phase) -> Cmd {
    let cancel_after = match phase {
        Phase::PreSnapshot | Phase::PostSnapshot => 0,
        Phase::PostBackup | Phase::OnFailure => crate::signals::count(),
    };
    let mut c = Cmd::new(&hook.argv[0])
        .args(&hook.argv[1..])
        .timeout(hook.timeout)
        .cancellable(cancel_after);
    for (k, v) in &env.0 {
        c = c.env(k.clone(), v);
    }
    c = c.env("SNAPVEIL_PHASE", phase.as_str());
    if hook.held {
        c = c.env("SNAPVEIL_HELD", "1");
    }
    c
}

fn log_line(phase: Phase, line: &Line) {
    tracing::info!(
        hook = phase.as_str(),
        stream = line.stream(),
        "{}",
        line.text()
    );
}

/// Logs what `wait` still returned (a runner that could not stream it).
fn log_output(phase: Phase, out: &Output) {
    for l in out.stdout.split_inclusive(|b| *b == b'\n') {
        log_line(phase, &Line::Stdout(l.to_vec()));
    }
    for l in out.stderr.split_inclusive(|b| *b == b'\n') {
        log_line(phase, &Line::Stderr(l.to_vec()));
    }
}

/// Logs lines until the hook closes its output or `deadline` passes.
fn log_until(phase: Phase, rx: &mpsc::Receiver<Line>, deadline: Instant) {
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) => log_line(phase, &l),
            Err(_) => return,
        }
    }
}

/// Logs the rest of a hook's output on a thread, as it arrives (a held hook's lines
/// while it holds).
fn log_in_background(phase: Phase, rx: mpsc::Receiver<Line>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for l in rx {
            log_line(phase, &l);
        }
    })
}

/// Turns how a hook ended into its result, saying so in the log when it failed.
fn judge(phase: Phase, cmd: &str, exit: Exit) -> Result<(), HookError> {
    match exit {
        e if e.success() => Ok(()),
        Exit::Cancelled => Err(HookError::Interrupted {
            phase: phase.as_str(),
            cmd: cmd.to_string(),
            signal: crate::signals::last_signal_name(),
        }),
        exit => {
            tracing::warn!(hook = phase.as_str(), cmd = %cmd, %exit, "hook failed");
            Err(HookError::Failed {
                phase: phase.as_str(),
                cmd: cmd.to_string(),
                exit,
            })
        }
    }
}

fn spawn_err(phase: Phase, cmd: &Cmd) -> impl FnOnce(std::io::Error) -> HookError + '_ {
    move |source| HookError::Spawn {
        phase: phase.as_str(),
        cmd: cmd.to_string(),
        source,
    }
}

/// Runs the non-held hooks of `phase` in order; the first failure stops the rest.
///
/// # Errors
/// A hook that cannot start, exits non-zero, times out, or is interrupted by a signal.
pub fn run_phase(
    runner: &dyn Runner,
    hooks: &[Hook],
    phase: Phase,
    env: &HookEnv,
) -> Result<(), HookError> {
    for h in hooks.iter().filter(|h| h.phase == phase && !h.held) {
        let cmd = cmd_of(h, env, phase);
        tracing::info!(phase = phase.as_str(), cmd = %cmd, "running hook");
        let mut child = runner.spawn(&cmd).map_err(spawn_err(phase, &cmd))?;
        // Like </dev/null: a hook that reads stdin sees its end at once.
        child.close_stdin();
        let rx = child.take_lines();
        log_until(phase, &rx, Instant::now() + h.timeout);
        let out = child.wait().map_err(spawn_err(phase, &cmd))?;
        log_output(phase, &out);
        judge(phase, &cmd.to_string(), out.exit)?;
    }
    Ok(())
}

/// A held hook that announced READY and now holds its lock.
pub struct HeldHook {
    child: Option<Box<dyn RunningChild>>,
    logger: Option<JoinHandle<()>>,
    cmd: String,
}

/// Starts the held pre-snapshot hooks, each waited for until READY.
///
/// # Errors
/// A hook that cannot start, ends before READY, stays silent past its timeout (it is
/// killed), or is interrupted by a signal; hooks already holding are released by
/// dropping them.
pub fn start_held(
    runner: &dyn Runner,
    hooks: &[Hook],
    env: &HookEnv,
) -> Result<Vec<HeldHook>, HookError> {
    let phase = Phase::PreSnapshot;
    let mut held = Vec::new();
    for h in hooks.iter().filter(|h| h.held) {
        let cmd = cmd_of(h, env, phase);
        tracing::info!(cmd = %cmd, "starting held hook");
        let mut child = runner.spawn(&cmd).map_err(spawn_err(phase, &cmd))?;
        let rx = child.take_lines();
        let deadline = Instant::now() + h.timeout;
        let ready = loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Line::Stdout(l)) if l.trim_ascii_end() == b"READY" => break Ok(()),
                Ok(l) => log_line(phase, &l),
                Err(e) => break Err(e),
            }
        };
        match ready {
            Ok(()) => held.push(HeldHook {
                child: Some(child),
                logger: Some(log_in_background(phase, rx)),
                cmd: cmd.to_string(),
            }),
            Err(RecvTimeoutError::Disconnected) => {
                child.close_stdin();
                let out = child.wait().map_err(spawn_err(phase, &cmd))?;
                log_output(phase, &out);
                return Err(match out.exit {
                    Exit::Cancelled => HookError::Interrupted {
                        phase: phase.as_str(),
                        cmd: cmd.to_string(),
                        signal: crate::signals::last_signal_name(),
                    },
                    exit => HookError::EndedEarly {
                        cmd: cmd.to_string(),
                        exit,
                    },
                });
            }
            Err(RecvTimeoutError::Timeout) => {
                // SIGTERM first, so that a hook that half-took its lock can let go.
                let _ = child.signal(libc::SIGTERM);
                log_until(phase, &rx, Instant::now() + Duration::from_secs(2));
                if let Ok(out) = child.wait() {
                    log_output(phase, &out);
                }
                return Err(HookError::NotReady {
                    cmd: cmd.to_string(),
                    secs: h.timeout.as_secs(),
                });
            }
        }
    }
    Ok(held)
}

impl HeldHook {
    /// Waits briefly for the hook's last lines to be logged, so that they come before
    /// "held hook released"; a grandchild that keeps the output open does not hold us.
    fn join_logger(&mut self) {
        if let Some(t) = self.logger.take() {
            let until = Instant::now() + Duration::from_secs(1);
            while !t.is_finished() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }

    /// Tells the hook to release (EOF on stdin) and checks how it ended.
    ///
    /// # Errors
    /// A non-zero exit: the lock may not have held for the whole snapshot.
    pub fn finish(mut self) -> Result<(), HookError> {
        let mut child = self.child.take().expect("child until finished");
        child.close_stdin();
        let out = child.wait().map_err(|source| HookError::Spawn {
            phase: "pre_snapshot",
            cmd: self.cmd.clone(),
            source,
        })?;
        self.join_logger();
        log_output(Phase::PreSnapshot, &out);
        judge(Phase::PreSnapshot, &self.cmd, out.exit)?;
        tracing::info!(cmd = %self.cmd, "held hook released");
        Ok(())
    }
}

impl Drop for HeldHook {
    fn drop(&mut self) {
        // Released without finish(): an error path. Closing stdin lets it unlock.
        if let Some(mut c) = self.child.take() {
            c.close_stdin();
            match c.wait() {
                Ok(out) => {
                    self.join_logger();
                    log_output(Phase::PreSnapshot, &out);
                }
                Err(e) => tracing::warn!(cmd = %self.cmd, "held hook: {e}"),
            }
        }
    }
}
