//! A test's own snapveil installation: a work dir with a key made by `snapveil init`, a
//! state dir and a config file, and the commands run against it; plus the small file
//! helpers the end-to-end tests share.

use crate::util::btrfs::BtrfsLoop;
use crate::util::fuse::is_mounted;
use crate::util::sshd::Sshd;
use crate::util::{bin, ok};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A work dir with a key made by `snapveil init`, a state dir and a config file.
pub struct Setup {
    pub work: tempfile::TempDir,
    pub key: PathBuf,
    pub pass: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
}

/// A test that failed half way can leave a view mounted under the work dir (a killed
/// run whose auto_unmount did not come, an assertion between mount and unmount): the
/// guard detaches every mount below it, deepest first, so the machine is left clean and
/// the work dir can go.
impl Drop for Setup {
    fn drop(&mut self) {
        let root = self.work.path().to_string_lossy().into_owned();
        let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        let mut below: Vec<String> = info
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|m| m.replace("\\040", " "))
            .filter(|m| m.starts_with(&format!("{root}/")))
            .collect();
        below.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in below {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    }
}

impl Setup {
    pub fn new() -> Setup {
        let work = tempfile::Builder::new()
            .prefix("snapveil-job-")
            .tempdir()
            .unwrap();
        let keys = work.path().join("keys");
        fs::create_dir(&keys).unwrap();
        let key = keys.join("key.conf");
        let pass = keys.join("key.pass");
        crate::util::init_key(&key, &pass);
        let state = work.path().join("state");
        let config = work.path().join("snapveil.toml");
        Setup {
            work,
            key,
            pass,
            state,
            config,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.work.path().join(rel)
    }

    /// A `[[job]]` table with this setup's key; `extra` is appended verbatim.
    pub fn job(&self, name: &str, source: &str, target: &str, extra: &str) -> String {
        format!(
            "[[job]]\nname = {name:?}\nsource = {source:?}\ntarget = {target:?}\n\
             key_config = {:?}\npassfile = {:?}\n{extra}\n",
            self.key.display().to_string(),
            self.pass.display().to_string()
        )
    }

    /// Writes a config with the one job `home`: btrfs subvolume `src` to the local
    /// directory `target` of this setup, which it returns.
    pub fn home_job(&self, src: &Path, extra: &str) -> PathBuf {
        let target = self.path("target");
        self.home_job_at(src, &target, extra);
        target
    }

    /// [`Setup::home_job`] to the local directory `target`.
    pub fn home_job_at(&self, src: &Path, target: &Path, extra: &str) {
        let source = format!("btrfs:{}", src.display());
        self.write_config(&[self.job("home", &source, target.to_str().unwrap(), extra)]);
    }

    /// A real sshd for this setup whose rrsync key is confined to the returned `jail`.
    pub fn sshd_with_jail(&self) -> (PathBuf, Sshd) {
        let jail = self.path("rrsync-root");
        fs::create_dir_all(&jail).unwrap();
        let sshd = Sshd::start(self.work.path(), &jail);
        (jail, sshd)
    }

    pub fn write_config(&self, jobs: &[String]) {
        let mut s = format!("state_dir = {:?}\n\n", self.state.display().to_string());
        for j in jobs {
            s.push_str(j);
            s.push('\n');
        }
        fs::write(&self.config, s).unwrap();
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args).arg("--config").arg(&self.config);
        c
    }

    pub fn run(&self, jobs: &[&str]) -> Output {
        let mut c = self.cmd(&["run"]);
        c.args(jobs);
        c.output().unwrap()
    }

    pub fn run_ok(&self, jobs: &[&str]) -> String {
        let mut c = self.cmd(&["run"]);
        c.args(jobs);
        ok(&mut c)
    }

    pub fn spawn_run(&self, job: &str) -> Child {
        self.cmd(&["run"])
            .arg(job)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub fn decrypt(&self, tree: &Path, out: &Path) {
        ok(Command::new(bin())
            .arg("decrypt")
            .arg("--config")
            .arg(&self.key)
            .arg("--passfile")
            .arg(&self.pass)
            .arg(tree)
            .arg(out));
    }

    pub fn view_mountpoint(&self, job: &str) -> PathBuf {
        self.state.join("view").join(job)
    }

    /// Nothing of job `job` is left: no snapshot subvolume, no view mount, no held lock.
    pub fn assert_clean(&self, job: &str, fs_: &BtrfsLoop) {
        let snaps: Vec<String> = fs_
            .subvolumes()
            .into_iter()
            .filter(|s| s.contains(&format!("snapveil-{job}-")))
            .collect();
        assert!(snaps.is_empty(), "snapshots left behind: {snaps:?}");
        assert!(
            !is_mounted(&self.view_mountpoint(job)),
            "view of {job} still mounted"
        );
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(self.state.to_str().unwrap()),
            "a mount under the state dir is left:\n{mounts}"
        );
        let lock = self.state.join("locks").join(format!("{job}.lock"));
        if lock.exists() {
            let st = Command::new("flock")
                .args(["-n", "-E", "75"])
                .arg(&lock)
                .arg("true")
                .status()
                .unwrap();
            assert!(st.success(), "lock {} is still held", lock.display());
        }
    }
    pub fn status_error(&self, job: &str) -> String {
        let p = self.state.join("status").join(format!("{job}.json"));
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
        v["error"].as_str().unwrap_or_default().to_string()
    }
}

pub fn write(root: &Path, rel: &str, data: &[u8]) {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, data).unwrap();
}

pub fn random(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut v))
        .unwrap();
    v
}

pub fn dirs(p: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
