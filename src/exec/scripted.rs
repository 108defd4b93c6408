//! A runner for tests that replays recorded command lines: a queue of
//! `(expected argv, Output)`. It panics on the first unexpected command and, when
//! dropped, on expectations left over, so a test pins the exact sequence a provider
//! issues (how LVM and `zfs send -w` are verified on machines that cannot run them).

use super::{Cmd, Line, Output, Runner, RunningChild};
use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::sync::{mpsc, Mutex};

#[derive(Default)]
pub struct ScriptedRunner {
    expected: Mutex<VecDeque<(Vec<String>, Output)>>,
    seen: Mutex<Vec<Vec<String>>>,
}

impl ScriptedRunner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Expects `argv` next (program and arguments, e.g. `["lvs", "--noheadings", ...]`)
    /// and answers with `out`.
    pub fn expect<S: AsRef<str>>(&self, argv: &[S], out: Output) -> &Self {
        let argv = argv.iter().map(|s| s.as_ref().to_owned()).collect();
        self.expected.lock().unwrap().push_back((argv, out));
        self
    }

    /// Every command line seen so far.
    pub fn seen(&self) -> Vec<Vec<String>> {
        self.seen.lock().unwrap().clone()
    }

    fn next(&self, cmd: &Cmd) -> Output {
        let argv = cmd.argv();
        self.seen.lock().unwrap().push(argv.clone());
        let mut q = self.expected.lock().unwrap();
        match q.pop_front() {
            Some((want, out)) if want == argv => out,
            Some((want, _)) => {
                drop(q);
                panic!("unexpected command\n  got:  {argv:?}\n  want: {want:?}")
            }
            None => {
                drop(q);
                panic!("unexpected command (no more expected): {argv:?}")
            }
        }
    }
}

/// `lvs` as the LVM provider runs it, before the target (`vg0/root` or `vg0`). Written
/// here as a command line, apart from the provider's own, so the tests pin it.
const LVS: &str =
    "lvs --noheadings --nosuffix --units b --separator | -o lv_name,vg_name,lv_attr,lv_size,origin,snap_percent";

/// Domain helpers: the command lines the snapshot providers issue (with default tool
/// names), each written once so that tests name the step and its answer, not the argv.
impl ScriptedRunner {
    /// `zfs snapshot <snap>` (`snap` is `dataset@name`).
    pub fn expect_zfs_snapshot(&self, snap: &str, out: Output) -> &Self {
        self.expect(&["zfs", "snapshot", snap], out)
    }

    /// `zfs get -H -p -o value mountpoint,mounted <dataset>`; answer `"<mp>\n<yes|no>\n"`.
    pub fn expect_zfs_get_mountpoint(&self, dataset: &str, out: Output) -> &Self {
        let argv: Vec<&str> = "zfs get -H -p -o value mountpoint,mounted"
            .split(' ')
            .chain([dataset])
            .collect();
        self.expect(&argv, out)
    }

    /// `zfs clone -o readonly=on -o mountpoint=<mountpoint> <snap> <clone>`.
    pub fn expect_zfs_clone(
        &self,
        snap: &str,
        clone: &str,
        mountpoint: &Path,
        out: Output,
    ) -> &Self {
        let mp = format!("mountpoint={}", mountpoint.display());
        let argv = ["zfs", "clone", "-o", "readonly=on", "-o", &mp, snap, clone];
        self.expect(&argv, out)
    }

    /// `zfs destroy <target>`.
    pub fn expect_zfs_destroy(&self, target: &str, out: Output) -> &Self {
        self.expect(&["zfs", "destroy", target], out)
    }

    /// `zfs destroy -r <target>`.
    pub fn expect_zfs_destroy_recursive(&self, target: &str, out: Output) -> &Self {
        self.expect(&["zfs", "destroy", "-r", target], out)
    }

    /// `lvs --noheadings --nosuffix --units b --separator | -o <fields> <target>`.
    pub fn expect_lvs(&self, target: &str, out: Output) -> &Self {
        let argv: Vec<&str> = LVS.split(' ').chain([target]).collect();
        self.expect(&argv, out)
    }

    /// `lvcreate --snapshot --size <size> --name <name> <origin>`.
    pub fn expect_lvcreate_snapshot(
        &self,
        size: &str,
        name: &str,
        origin: &str,
        out: Output,
    ) -> &Self {
        let argv = [
            "lvcreate",
            "--snapshot",
            "--size",
            size,
            "--name",
            name,
            origin,
        ];
        self.expect(&argv, out)
    }

    /// `blkid -o value -s TYPE <dev>`; answer `"ext4\n"`.
    pub fn expect_blkid_type(&self, dev: &str, out: Output) -> &Self {
        self.expect(&["blkid", "-o", "value", "-s", "TYPE", dev], out)
    }

    /// `mount -t <fstype> -o <options> <dev> <mountpoint>`.
    pub fn expect_mount(
        &self,
        fstype: &str,
        options: &str,
        dev: &str,
        mountpoint: &Path,
        out: Output,
    ) -> &Self {
        let mp = mountpoint.display().to_string();
        self.expect(&["mount", "-t", fstype, "-o", options, dev, &mp], out)
    }

    /// `umount <mountpoint>`.
    pub fn expect_umount(&self, mountpoint: &Path, out: Output) -> &Self {
        self.expect(&["umount", &mountpoint.display().to_string()], out)
    }

    /// `lvremove -f <lv>` (`lv` is `vg/name`).
    pub fn expect_lvremove(&self, lv: &str, out: Output) -> &Self {
        self.expect(&["lvremove", "-f", lv], out)
    }
}

impl Runner for ScriptedRunner {
    fn output(&self, cmd: &Cmd) -> io::Result<Output> {
        Ok(self.next(cmd))
    }

    fn spawn(&self, cmd: &Cmd) -> io::Result<Box<dyn RunningChild>> {
        let out = self.next(cmd);
        Ok(Box::new(ScriptedChild {
            out: Some(out),
            lines: Vec::new(),
        }))
    }
}

impl Drop for ScriptedRunner {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let left = self.expected.lock().map(|q| q.len()).unwrap_or(0);
        if left > 0 {
            let q = self.expected.lock().unwrap();
            panic!(
                "{left} expected command(s) never ran, first: {:?}",
                q.front().map(|e| &e.0)
            );
        }
    }
}

struct ScriptedChild {
    out: Option<Output>,
    lines: Vec<Vec<u8>>,
}

impl RunningChild for ScriptedChild {
    fn pid(&self) -> Option<u32> {
        None
    }
    fn write_stdin(&mut self, _data: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn close_stdin(&mut self) {}
    fn read_line(&mut self) -> io::Result<Option<Vec<u8>>> {
        if self.lines.is_empty() {
            if let Some(out) = self.out.as_mut() {
                let text = std::mem::take(&mut out.stdout);
                self.lines = text
                    .split_inclusive(|b| *b == b'\n')
                    .rev()
                    .map(|l| l.to_vec())
                    .collect();
            }
        }
        Ok(self.lines.pop())
    }
    fn take_lines(&mut self) -> mpsc::Receiver<Line> {
        let (tx, rx) = mpsc::channel();
        let mut stdout: Vec<u8> = self.lines.drain(..).rev().flatten().collect();
        let mut stderr = Vec::new();
        if let Some(out) = self.out.as_mut() {
            stdout.extend(std::mem::take(&mut out.stdout));
            stderr = std::mem::take(&mut out.stderr);
        }
        for l in stdout.split_inclusive(|b| *b == b'\n') {
            let _ = tx.send(Line::Stdout(l.to_vec()));
        }
        for l in stderr.split_inclusive(|b| *b == b'\n') {
            let _ = tx.send(Line::Stderr(l.to_vec()));
        }
        rx
    }
    fn take_stdout(&mut self) -> Option<Box<dyn io::Read + Send>> {
        let out = self.out.as_mut()?;
        let bytes = std::mem::take(&mut out.stdout);
        Some(Box::new(io::Cursor::new(bytes)))
    }
    /// What a scripted command is fed is not checked: the command line is.
    fn take_stdin(&mut self) -> Option<Box<dyn io::Write + Send>> {
        Some(Box::new(io::sink()))
    }
    fn signal(&mut self, _sig: i32) -> io::Result<()> {
        Ok(())
    }
    fn wait(mut self: Box<Self>) -> io::Result<Output> {
        let mut out = self.out.take().unwrap_or_else(|| Output::ok(""));
        let rest: Vec<u8> = self.lines.drain(..).rev().flatten().collect();
        if out.stdout.is_empty() {
            out.stdout = rest;
        }
        Ok(out)
    }
}
