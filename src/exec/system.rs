//! The real runner: spawns processes, logs each command line and its duration, drains
//! stderr on a thread so a chatty tool cannot deadlock us, enforces timeouts by killing
//! the whole process group, stops cancellable commands when snapveil gets a terminating
//! signal ([`Cmd::cancellable`]), and kills and reaps a child that is dropped unfinished.

use super::{Cmd, Exit, Line, Output, Runner, RunningChild};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a cancelled command gets between SIGTERM and SIGKILL: enough for a held
/// hook to unlock its tables or thaw a filesystem, short enough for `systemctl stop`.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

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
    // Its own group also shields the child from a kill -9 of snapveil's group: without
    // this it would run on as an orphan (a restore's rsync filling a stage that cleanup
    // just removed). SIGTERM, not SIGKILL, so that a held hook can still unlock or thaw.
    // The death signal follows the spawning *thread*; every spawning thread here waits
    // for or outlives its children (the job's thread, `output`'s caller).
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls (prctl, getppid, kill).
    let parent = std::process::id() as libc::pid_t;
    unsafe {
        c.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            // snapveil died between fork and prctl: the signal was already missed.
            if libc::getppid() != parent {
                libc::kill(libc::getpid(), libc::SIGTERM);
            }
            Ok(())
        });
    }
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

/// Reads `r` line by line into `tx` as `wrap(line)`, until end of stream.
fn forward_lines<R: Read + Send + 'static>(
    r: R,
    tx: mpsc::Sender<Line>,
    wrap: fn(Vec<u8>) -> Line,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        loop {
            let mut line = Vec::new();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if tx.send(wrap(line)).is_err() {
                        break;
                    }
                }
            }
        }
    })
}

fn kill_pgid(pgid: u32, sig: i32) {
    // SAFETY: kill(2) with a negative pid signals the process group the runner created
    // in `build`; no memory is touched.
    unsafe {
        libc::kill(-(pgid as i32), sig);
    }
}

fn kill_group(child: &Child, sig: i32) {
    kill_pgid(child.id(), sig);
}

/// The one place where a terminating signal reaches a child: a thread that polls
/// [`crate::signals::count`] and sends SIGTERM to the child's process group once it
/// passes the command's threshold. A thread rather than the waiter's loop, because the
/// owner of a spawned child is usually blocked reading its output (rsync's file list,
/// a held hook's READY), and only the child's end unblocks it.
struct CancelWatch {
    stop: Arc<AtomicBool>,
    fired: Arc<AtomicBool>,
    fired_at: Arc<std::sync::Mutex<Option<Instant>>>,
    thread: Option<JoinHandle<()>>,
}

impl CancelWatch {
    fn start(pgid: u32, after: usize, shown: String) -> CancelWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let fired = Arc::new(AtomicBool::new(false));
        let fired_at = Arc::new(std::sync::Mutex::new(None));
        let (s, f, at) = (Arc::clone(&stop), Arc::clone(&fired), Arc::clone(&fired_at));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if crate::signals::count() > after {
                    tracing::info!(cmd = %shown, "interrupted: stopping the command (SIGTERM to its process group)");
                    if let Ok(mut at) = at.lock() {
                        *at = Some(Instant::now());
                    }
                    f.store(true, Ordering::SeqCst);
                    kill_pgid(pgid, libc::SIGTERM);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        CancelWatch {
            stop,
            fired,
            fired_at,
            thread: Some(thread),
        }
    }

    fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// True once the grace period after SIGTERM is over: time for SIGKILL.
    fn grace_over(&self) -> bool {
        self.fired_at
            .lock()
            .ok()
            .and_then(|at| *at)
            .is_some_and(|at| at.elapsed() >= CANCEL_GRACE)
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for CancelWatch {
    fn drop(&mut self) {
        self.finish();
    }
}

fn watch_for(cmd: &Cmd, child: &Child) -> Option<CancelWatch> {
    cmd.get_cancel_after()
        .map(|after| CancelWatch::start(child.id(), after, cmd.to_string()))
}

/// Waits with an optional deadline; on expiry kills the group and reports `TimedOut`.
/// A cancelled child is reported as `Cancelled`, and killed if SIGTERM did not end it
/// within the grace period.
fn wait_deadline(
    child: &mut Child,
    timeout: Option<Duration>,
    mut watch: Option<&mut CancelWatch>,
) -> io::Result<Exit> {
    if timeout.is_none() && watch.is_none() {
        return Ok(exit_of(child.wait()?));
    }
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut killed = false;
    loop {
        if let Some(st) = child.try_wait()? {
            if let Some(w) = watch.as_mut() {
                w.finish();
                if w.fired() {
                    return Ok(Exit::Cancelled);
                }
            }
            return Ok(exit_of(st));
        }
        if let Some(w) = watch.as_ref() {
            if !killed && w.grace_over() {
                tracing::warn!(
                    "the command did not stop within {CANCEL_GRACE:?} of SIGTERM: killing it"
                );
                kill_group(child, libc::SIGKILL);
                killed = true;
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            if let Some(w) = watch.as_mut() {
                w.finish();
            }
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
        if let Some(r) = cmd.get_relay() {
            // SAFETY: the caller keeps both descriptors open for the call (Cmd::relay);
            // we only duplicate them for the child.
            let (i, o) = unsafe {
                (
                    std::os::fd::BorrowedFd::borrow_raw(r.stdin).try_clone_to_owned()?,
                    std::os::fd::BorrowedFd::borrow_raw(r.stdout).try_clone_to_owned()?,
                )
            };
            c.stdin(Stdio::from(i))
                .stdout(Stdio::from(o))
                .stderr(Stdio::inherit());
        } else {
            c.stdin(if cmd.get_stdin().is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let mut child = c.spawn()?;
        let out_t = drain(child.stdout.take());
        let err_t = drain(child.stderr.take());
        if let (Some(data), Some(mut stdin)) = (cmd.get_stdin(), child.stdin.take()) {
            let data = data.to_vec();
            std::thread::spawn(move || {
                let _ = stdin.write_all(&data);
            });
        }
        let mut watch = watch_for(cmd, &child);
        let exit = wait_deadline(&mut child, cmd.get_timeout(), watch.as_mut())?;
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
        // stderr always goes through the line channel: `wait` collects it from there,
        // `take_lines` hands the channel to the caller.
        let (tx, rx) = mpsc::channel();
        let err_t = child
            .stderr
            .take()
            .map(|e| forward_lines(e, tx.clone(), Line::Stderr));
        let watch = watch_for(cmd, &child);
        if let (Some(data), Some(s)) = (cmd.get_stdin(), stdin.as_mut()) {
            s.write_all(data)?;
        }
        Ok(Box::new(SystemChild {
            child: Some(child),
            stdin,
            stdout,
            stderr: err_t,
            lines: Some(rx),
            tx: Some(tx),
            watch,
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
    stderr: Option<JoinHandle<()>>,
    /// Where stderr lines (and stdout lines after `take_lines`) arrive; `None` once taken.
    lines: Option<mpsc::Receiver<Line>>,
    /// A sender for the stdout forwarder of `take_lines`; dropped by then or by `wait`,
    /// so that the channel closes with the child's streams.
    tx: Option<mpsc::Sender<Line>>,
    watch: Option<CancelWatch>,
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

    fn take_lines(&mut self) -> mpsc::Receiver<Line> {
        let tx = self.tx.take();
        match (self.lines.take(), tx) {
            (Some(rx), Some(tx)) => {
                if let Some(out) = self.stdout.take() {
                    forward_lines(out.into_inner(), tx, Line::Stdout);
                }
                rx
            }
            _ => mpsc::channel().1,
        }
    }

    fn take_stdout(&mut self) -> Option<Box<dyn io::Read + Send>> {
        self.stdout
            .take()
            .map(|r| Box::new(r) as Box<dyn io::Read + Send>)
    }

    fn take_stdin(&mut self) -> Option<Box<dyn io::Write + Send>> {
        self.stdin
            .take()
            .map(|w| Box::new(w) as Box<dyn io::Write + Send>)
    }

    fn signal(&mut self, sig: i32) -> io::Result<()> {
        if let Some(c) = self.child.as_ref() {
            kill_group(c, sig);
        }
        Ok(())
    }

    fn wait(mut self: Box<Self>) -> io::Result<Output> {
        self.stdin = None;
        self.tx = None;
        let mut child = self.child.take().expect("child present until wait");
        let out_t = drain(self.stdout.take());
        let remaining = self
            .timeout
            .map(|t| t.saturating_sub(self.started.elapsed()));
        let exit = wait_deadline(&mut child, remaining, self.watch.as_mut())?;
        let stdout = out_t.join().unwrap_or_default();
        let mut stderr = Vec::new();
        if let Some(rx) = self.lines.take() {
            if let Some(t) = self.stderr.take() {
                let _ = t.join();
            }
            for l in rx.try_iter() {
                if let Line::Stderr(b) = l {
                    stderr.extend(b);
                }
            }
        }
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
        // Never leave a child running behind us: kill the group and reap it. The cancel
        // watcher stops first, so it never signals a group id reused after the reap.
        if let Some(w) = self.watch.as_mut() {
            w.finish();
        }
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

    /// A relayed command talks over the given descriptors, not over pipes of ours
    /// (serve-pull hands rsync the ssh channel).
    #[test]
    fn relayed_command_uses_the_given_descriptors() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in"), "abc\n").unwrap();
        let input = std::fs::File::open(dir.path().join("in")).unwrap();
        let output = std::fs::File::create(dir.path().join("out")).unwrap();
        let out = SystemRunner
            .output(
                &Cmd::new("tr")
                    .args(["a-z", "A-Z"])
                    .relay(input.as_raw_fd(), output.as_raw_fd()),
            )
            .unwrap();
        assert_eq!(out.exit, Exit::Code(0));
        assert!(out.stdout.is_empty());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out")).unwrap(),
            "ABC\n"
        );
    }

    #[test]
    fn lines_arrive_while_the_child_runs() {
        let mut c = SystemRunner
            .spawn(&Cmd::new("sh").args(["-c", "echo out; echo err >&2; read x; echo late"]))
            .unwrap();
        let rx = c.take_lines();
        let mut first = vec![
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
        ];
        first.sort_by_key(|l| l.stream());
        assert_eq!(
            first,
            [
                Line::Stderr(b"err\n".to_vec()),
                Line::Stdout(b"out\n".to_vec())
            ]
        );
        c.close_stdin();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            Line::Stdout(b"late\n".to_vec())
        );
        let out = c.wait().unwrap();
        assert_eq!(out.exit, Exit::Code(0));
        assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    }

    #[test]
    fn spawned_stderr_is_returned_by_wait_when_lines_are_not_taken() {
        let c = SystemRunner
            .spawn(&Cmd::new("sh").args(["-c", "echo a >&2; echo b >&2; echo o"]))
            .unwrap();
        let out = c.wait().unwrap();
        assert_eq!(out.stderr, b"a\nb\n");
        assert_eq!(out.stdout, b"o\n");
    }

    #[test]
    fn stdin_is_fed() {
        let out = SystemRunner
            .output(&Cmd::new("cat").stdin(b"abc".to_vec()))
            .unwrap();
        assert_eq!(out.stdout, b"abc");
    }
}
