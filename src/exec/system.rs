//! The real runner: spawns processes, logs each command line and its duration, drains
//! stderr on a thread so a chatty tool cannot deadlock us, enforces timeouts by killing
//! the whole process group, and kills and reaps a child that is dropped unfinished.

use super::{Cmd, Exit, Output, Runner, RunningChild};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, Default)]
pub struct SystemRunner;

fn build(cmd: &Cmd) -> Command {
    let mut c = Command::new(cmd.program());
    c.args(cmd.get_args());
    for (k, v) in cmd.get_env() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_cwd() {
        c.current_dir(dir);
    }
    // Own process group: a timeout or cancellation kills the tool and its children
    // (a hook's `sleep`, rsync's ssh) together, and a terminal's Ctrl-C reaches only us,
    // so that cleanup decides the order in which things stop.
    c.process_group(0);
    c
}

fn exit_of(status: ExitStatus) -> Exit {
    match (status.code(), status.signal()) {
        (Some(c), _) => Exit::Code(c),
        (None, Some(s)) => Exit::Signal(s),
        (None, None) => Exit::Code(-1),
    }
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

fn kill_group(child: &Child, sig: i32) {
    // SAFETY: kill(2) with a negative pid signals the process group we created in
    // `build`; no memory is touched.
    unsafe {
        libc::kill(-(child.id() as i32), sig);
    }
}

/// Waits with an optional deadline; on expiry kills the group and reports `TimedOut`.
fn wait_deadline(child: &mut Child, timeout: Option<Duration>) -> io::Result<Exit> {
    let Some(timeout) = timeout else {
        return Ok(exit_of(child.wait()?));
    };
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(exit_of(st));
        }
        if Instant::now() >= deadline {
            kill_group(child, libc::SIGTERM);
            std::thread::sleep(Duration::from_millis(200));
            if child.try_wait()?.is_none() {
                kill_group(child, libc::SIGKILL);
            }
            child.wait()?;
            return Ok(Exit::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Runner for SystemRunner {
    fn output(&self, cmd: &Cmd) -> io::Result<Output> {
        let span = tracing::debug_span!("cmd", cmd = %cmd);
        let _g = span.enter();
        let start = Instant::now();
        let mut c = build(cmd);
        c.stdin(if cmd.get_stdin().is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = c.spawn()?;
        let out_t = drain(child.stdout.take());
        let err_t = drain(child.stderr.take());
        if let (Some(data), Some(mut stdin)) = (cmd.get_stdin(), child.stdin.take()) {
            let data = data.to_vec();
            std::thread::spawn(move || {
                let _ = stdin.write_all(&data);
            });
        }
        let exit = wait_deadline(&mut child, cmd.get_timeout())?;
        let stdout = out_t.join().unwrap_or_default();
        let stderr = err_t.join().unwrap_or_default();
        tracing::debug!(%exit, elapsed_ms = start.elapsed().as_millis() as u64, "command finished");
        Ok(Output {
            exit,
            stdout,
            stderr,
        })
    }

    fn spawn(&self, cmd: &Cmd) -> io::Result<Box<dyn RunningChild>> {
        tracing::debug!(cmd = %cmd, "spawn");
        let mut c = build(cmd);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn()?;
        let mut stdin = child.stdin.take();
        let stdout = child.stdout.take().map(BufReader::new);
        let err_t = drain(child.stderr.take());
        if let (Some(data), Some(s)) = (cmd.get_stdin(), stdin.as_mut()) {
            s.write_all(data)?;
        }
        Ok(Box::new(SystemChild {
            child: Some(child),
            stdin,
            stdout,
            stderr: Some(err_t),
            timeout: cmd.get_timeout(),
            started: Instant::now(),
            display: cmd.to_string(),
        }))
    }
}

struct SystemChild {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    stdout: Option<BufReader<ChildStdout>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    timeout: Option<Duration>,
    started: Instant,
    display: String,
}

impl RunningChild for SystemChild {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn write_stdin(&mut self, data: &[u8]) -> io::Result<()> {
        match self.stdin.as_mut() {
            Some(s) => s.write_all(data).and_then(|_| s.flush()),
            None => Err(io::Error::new(io::ErrorKind::BrokenPipe, "stdin closed")),
        }
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    fn read_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        let Some(r) = self.stdout.as_mut() else {
            return Ok(None);
        };
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            return Ok(None);
        }
        Ok(Some(line))
    }

    fn signal(&mut self, sig: i32) -> io::Result<()> {
        if let Some(c) = self.child.as_ref() {
            kill_group(c, sig);
        }
        Ok(())
    }

    fn wait(mut self: Box<Self>) -> io::Result<Output> {
        self.stdin = None;
        let mut child = self.child.take().expect("child present until wait");
        let out_t = drain(self.stdout.take());
        let remaining = self
            .timeout
            .map(|t| t.saturating_sub(self.started.elapsed()));
        let exit = wait_deadline(&mut child, remaining)?;
        let stdout = out_t.join().unwrap_or_default();
        let stderr = self
            .stderr
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default();
        tracing::debug!(cmd = %self.display, %exit, elapsed_ms = self.started.elapsed().as_millis() as u64, "child finished");
        Ok(Output {
            exit,
            stdout,
            stderr,
        })
    }
}

impl Drop for SystemChild {
    fn drop(&mut self) {
        // Never leave a child running behind us: kill the group and reap it.
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                tracing::warn!(cmd = %self.display, "killing unfinished child");
                kill_group(&c, libc::SIGKILL);
            }
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_output_and_exit() {
        let out = SystemRunner
            .output(&Cmd::new("sh").args(["-c", "echo hi; echo err >&2; exit 3"]))
            .unwrap();
        assert_eq!(out.exit, Exit::Code(3));
        assert_eq!(out.stdout, b"hi\n");
        assert_eq!(out.stderr, b"err\n");
    }

    #[test]
    fn timeout_kills_the_group() {
        let t = Instant::now();
        let out = SystemRunner
            .output(
                &Cmd::new("sh")
                    .args(["-c", "sleep 30 & sleep 30"])
                    .timeout(Duration::from_millis(300)),
            )
            .unwrap();
        assert_eq!(out.exit, Exit::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn stdin_is_fed() {
        let out = SystemRunner
            .output(&Cmd::new("cat").stdin(b"abc".to_vec()))
            .unwrap();
        assert_eq!(out.stdout, b"abc");
    }
}
