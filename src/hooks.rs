//! Hook commands around a job: environment, timeout, output into the log (stdout at
//! info, stderr at warn, line by line), and *held* pre-snapshot hooks that keep a lock
//! (e.g. `FLUSH TABLES WITH READ LOCK`, which dies with its session) until the snapshot
//! exists.
//!
//! Held protocol: the hook prints a line `READY` on stdout once it holds; snapveil takes
//! the snapshot and closes the hook's stdin; on EOF the hook releases and exits 0.

use crate::config::{Hook, Phase};
use crate::exec::{Cmd, Exit, Output, Runner, RunningChild};
use std::sync::mpsc;

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
    let mut c = Cmd::new(&hook.argv[0])
        .args(&hook.argv[1..])
        .timeout(hook.timeout);
    for (k, v) in &env.0 {
        c = c.env(k.clone(), v);
    }
    c = c.env("SNAPVEIL_PHASE", phase.as_str());
    if hook.held {
        c = c.env("SNAPVEIL_HELD", "1");
    }
    c
}

fn log_output(phase: Phase, out: &Output) {
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        tracing::info!(hook = phase.as_str(), "{l}");
    }
    for l in String::from_utf8_lossy(&out.stderr).lines() {
        tracing::warn!(hook = phase.as_str(), "{l}");
    }
}

/// Runs the non-held hooks of `phase` in order; the first failure stops the rest.
///
/// # Errors
/// A hook that cannot start, exits non-zero, or times out.
pub fn run_phase(
    runner: &dyn Runner,
    hooks: &[Hook],
    phase: Phase,
    env: &HookEnv,
) -> Result<(), HookError> {
    for h in hooks.iter().filter(|h| h.phase == phase && !h.held) {
        let cmd = cmd_of(h, env, phase);
        tracing::info!(phase = phase.as_str(), cmd = %cmd, "running hook");
        let out = runner.output(&cmd).map_err(|source| HookError::Spawn {
            phase: phase.as_str(),
            cmd: cmd.to_string(),
            source,
        })?;
        log_output(phase, &out);
        if !out.exit.success() {
            return Err(HookError::Failed {
                phase: phase.as_str(),
                cmd: cmd.to_string(),
                exit: out.exit,
            });
        }
    }
    Ok(())
}

/// A held hook that announced READY and now holds its lock.
pub struct HeldHook {
    child: Option<Box<dyn RunningChild>>,
    cmd: String,
}

/// Starts the held pre-snapshot hooks, each waited for until READY.
///
/// # Errors
/// A hook that cannot start, ends before READY, or stays silent past its timeout (it is
/// killed); hooks already holding are released by dropping them.
pub fn start_held(
    runner: &dyn Runner,
    hooks: &[Hook],
    env: &HookEnv,
) -> Result<Vec<HeldHook>, HookError> {
    let mut held = Vec::new();
    for h in hooks.iter().filter(|h| h.held) {
        let cmd = cmd_of(h, env, Phase::PreSnapshot);
        tracing::info!(cmd = %cmd, "starting held hook");
        let child = runner.spawn(&cmd).map_err(|source| HookError::Spawn {
            phase: "pre_snapshot",
            cmd: cmd.to_string(),
            source,
        })?;
        let pid = child.pid();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut child = child;
            let mut ready = false;
            while let Ok(Some(line)) = child.read_line() {
                let l = String::from_utf8_lossy(&line).trim_end().to_string();
                if l == "READY" {
                    ready = true;
                    break;
                }
                tracing::info!(hook = "pre_snapshot", "{l}");
            }
            let _ = tx.send(ready);
            child
        });
        let ready = rx.recv_timeout(h.timeout);
        if ready.is_err() {
            if let Some(pid) = pid {
                // SAFETY: signals the hook's own process group (the runner made one).
                unsafe {
                    libc::kill(-(pid as i32), libc::SIGTERM);
                }
            }
        }
        let mut child = reader.join().expect("hook reader thread");
        match ready {
            Ok(true) => held.push(HeldHook {
                child: Some(child),
                cmd: cmd.to_string(),
            }),
            Ok(false) => {
                child.close_stdin();
                let out = child.wait().map_err(|source| HookError::Spawn {
                    phase: "pre_snapshot",
                    cmd: cmd.to_string(),
                    source,
                })?;
                log_output(Phase::PreSnapshot, &out);
                return Err(HookError::EndedEarly {
                    cmd: cmd.to_string(),
                    exit: out.exit,
                });
            }
            Err(_) => {
                let out = child.wait();
                if let Ok(out) = out {
                    log_output(Phase::PreSnapshot, &out);
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
        log_output(Phase::PreSnapshot, &out);
        if out.exit.success() {
            tracing::info!(cmd = %self.cmd, "held hook released");
            Ok(())
        } else {
            Err(HookError::Failed {
                phase: "pre_snapshot",
                cmd: self.cmd.clone(),
                exit: out.exit,
            })
        }
    }
}

impl Drop for HeldHook {
    fn drop(&mut self) {
        // Released without finish(): an error path. Closing stdin lets it unlock.
        if let Some(mut c) = self.child.take() {
            c.close_stdin();
            match c.wait() {
                Ok(out) => log_output(Phase::PreSnapshot, &out),
                Err(e) => tracing::warn!(cmd = %self.cmd, "held hook: {e}"),
            }
        }
    }
}
