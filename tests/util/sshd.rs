//! A real OpenSSH server on 127.0.0.1 with its own host key and client keys, killed on
//! drop. Two client keys: `full` may run anything (a shell, for merges and checks), `rrsync`
//! is restricted the way backup hosts restrict it: `command="rrsync DIR",restrict`.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Sshd {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    /// Private key with no restriction.
    pub full_key: PathBuf,
    /// Private key whose authorized_keys line forces `rrsync <rrsync_dir>`.
    pub rrsync_key: PathBuf,
    /// Private key whose authorized_keys line is [`Sshd::start_with`]'s `forced` line
    /// (pull mode's `command="snapveil serve-pull JOB",restrict`), if any.
    pub forced_key: Option<PathBuf>,
    pub user: String,
}

fn keygen(path: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "snapveil-test", "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen");
    assert!(out.status.success(), "ssh-keygen: {out:?}");
    fs::read_to_string(path.with_extension("pub")).unwrap()
}

impl Sshd {
    /// Starts sshd; the `rrsync` key is confined to `rrsync_dir` (rrsync's own chroot-like
    /// path restriction, as `command="rrsync DIR"` on a backup host).
    pub fn start(work: &Path, rrsync_dir: &Path) -> Sshd {
        Sshd::start_with(work, rrsync_dir, None, &[])
    }

    /// [`Sshd::start`], plus a third key authorized with the option list `forced` (e.g.
    /// `command="snapveil serve-pull home",restrict`), and `set_env` (sshd's `SetEnv`:
    /// PATH, SNAPVEIL_CONFIG) in every session.
    pub fn start_with(
        work: &Path,
        rrsync_dir: &Path,
        forced: Option<&str>,
        set_env: &[(&str, String)],
    ) -> Sshd {
        assert!(super::require_tool("sshd") || Path::new("/usr/sbin/sshd").exists());
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let dir = work.join(format!("sshd-{port}"));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        let host_key = dir.join("host_key");
        keygen(&host_key);
        let full_key = dir.join("full_key");
        let rrsync_key = dir.join("rrsync_key");
        let full_pub = keygen(&full_key);
        let rr_pub = keygen(&rrsync_key);
        let rrsync = which("rrsync");
        let auth = dir.join("authorized_keys");
        let mut lines = format!(
            "{}command=\"{} {}\",restrict {}",
            full_pub,
            rrsync,
            rrsync_dir.display(),
            rr_pub
        );
        let forced_key = forced.map(|opts| {
            let k = dir.join("forced_key");
            lines.push_str(&format!("{opts} {}", keygen(&k)));
            k
        });
        fs::write(&auth, lines).unwrap();
        // One line: sshd keeps the first SetEnv it reads.
        let set_env = if set_env.is_empty() {
            String::new()
        } else {
            let vars: Vec<String> = set_env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("SetEnv {}\n", vars.join(" "))
        };
        fs::create_dir_all("/run/sshd").unwrap();
        let conf = dir.join("sshd_config");
        fs::write(
            &conf,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {auth}\n\
                 PidFile {pid}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin yes\nLogLevel VERBOSE\n\
                 AcceptEnv none\nMaxStartups 50\n{set_env}",
                hk = host_key.display(),
                auth = auth.display(),
                pid = dir.join("sshd.pid").display(),
            ),
        )
        .unwrap();
        let log = fs::File::create(dir.join("sshd.log")).unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start sshd");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "sshd did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string();
        Sshd {
            child,
            port,
            dir,
            full_key,
            rrsync_key,
            forced_key,
            user,
        }
    }

    /// `ssh_args = [...]`: [`Sshd::ssh_args`] as a job's TOML line (no newline).
    pub fn ssh_args_toml(&self, key: &Path) -> String {
        let quoted: Vec<String> = self
            .ssh_args(key)
            .iter()
            .map(|a| format!("{a:?}"))
            .collect();
        format!("ssh_args = [{}]", quoted.join(", "))
    }

    /// ssh options (for a job's `ssh_args` or `ssh` on the command line) using `key`.
    pub fn ssh_args(&self, key: &Path) -> Vec<String> {
        [
            "-p",
            &self.port.to_string(),
            "-i",
            &key.display().to_string(),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// The same as one `ssh ...` command line (for rsync's `-e`).
    pub fn ssh_command(&self, key: &Path) -> String {
        format!("ssh {}", self.ssh_args(key).join(" "))
    }

    /// `user@127.0.0.1:path`.
    pub fn target(&self, path: &Path) -> String {
        format!("{}@127.0.0.1:{}", self.user, path.display())
    }

    /// The server's log, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("sshd.log")).unwrap_or_default()
    }
}

fn which(tool: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .unwrap();
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!s.is_empty(), "{tool} not found");
    s
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixture itself: the full key runs commands and rsync; the rrsync key runs rsync
    /// only, and only below its directory.
    #[test]
    fn sshd_fixture_full_and_rrsync_keys() {
        let work = tempfile::tempdir().unwrap();
        let jail = work.path().join("jail");
        fs::create_dir_all(&jail).unwrap();
        let sshd = Sshd::start(work.path(), &jail);
        let src = work.path().join("src");
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("f"), "hello").unwrap();

        let out = Command::new("ssh")
            .args(sshd.ssh_args(&sshd.full_key))
            .arg(format!("{}@127.0.0.1", sshd.user))
            .arg("echo shell-ok")
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "shell-ok",
            "{out:?}\n{}",
            sshd.log()
        );

        let out = Command::new("ssh")
            .args(sshd.ssh_args(&sshd.rrsync_key))
            .arg(format!("{}@127.0.0.1", sshd.user))
            .arg("echo shell-ok")
            .output()
            .unwrap();
        assert!(!out.status.success(), "rrsync key ran a shell: {out:?}");

        let st = Command::new("rsync")
            .args(["-a", "-e", &sshd.ssh_command(&sshd.rrsync_key)])
            .arg(format!("{}/", src.display()))
            .arg(format!("{}@127.0.0.1:sub/", sshd.user))
            .output()
            .unwrap();
        assert!(st.status.success(), "{st:?}\n{}", sshd.log());
        assert_eq!(fs::read_to_string(jail.join("sub/f")).unwrap(), "hello");
    }
}
