//! Pull mode (issue 16): a backup server pulls the encrypted view, as an unprivileged
//! account (`nobody`) over a real sshd on 127.0.0.1, either on demand through the forced
//! command `snapveil serve-pull` (a snapshot per pull) or from a persistent
//! `fuse.snapveil` mount made by mount(8) from an fstab line. The README's lines are run
//! as written, with only their paths and ids replaced by the test's.

use crate::util::btrfs::BtrfsLoop;
use crate::util::fuse::{gocryptfs_forward, is_mounted};
use crate::util::setup::{random, wait_for, write, Setup};
use crate::util::sshd::Sshd;
use crate::util::{bin, describe, ok, readme, require_tool};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The unprivileged backup-server account.
const NOBODY: u32 = 65534;

/// The README's first line starting with `start`.
fn readme_line(start: &str) -> String {
    readme()
        .lines()
        .find(|l| l.starts_with(start))
        .unwrap_or_else(|| panic!("README shows no line starting with {start:?}"))
        .to_string()
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// The pulling server: a home owned by `nobody`, holding the forced key and an ssh
/// config that names the client `client`, as on a real backup server.
struct Server {
    home: PathBuf,
}

impl Server {
    fn new(setup: &Setup, sshd: &Sshd) -> Server {
        chmod(setup.work.path(), 0o711);
        let home = setup.path("server");
        let ssh = home.join(".ssh");
        fs::create_dir_all(&ssh).unwrap();
        let key = ssh.join("id_pull");
        fs::copy(sshd.forced_key.as_ref().expect("a forced key"), &key).unwrap();
        chmod(&key, 0o600);
        fs::write(
            ssh.join("config"),
            format!(
                "Host client\n  HostName 127.0.0.1\n  User root\n  Port {}\n  IdentityFile {}\n  \
                 IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  \
                 BatchMode yes\n  LogLevel ERROR\n",
                sshd.port,
                key.display()
            ),
        )
        .unwrap();
        for p in [&home, &ssh, &key, &ssh.join("config")] {
            std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
        }
        Server { home }
    }

    /// `line` run by `sh` as nobody in the server's home.
    fn sh(&self, line: &str) -> Command {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "env",
            "-i",
            "PATH=/usr/bin:/bin",
        ])
        .arg(format!("HOME={}", self.home.display()))
        // ssh reads the config in the passwd entry's home, /nonexistent for nobody:
        // name ours, for rsync and for ssh itself.
        .arg(format!(
            "RSYNC_RSH=ssh -F {}",
            self.home.join(".ssh/config").display()
        ))
        .arg("sh")
        .arg("-c")
        .arg(format!(
            "ssh() {{ command ssh -F \"$HOME/.ssh/config\" \"$@\"; }}; {line}"
        ))
        .current_dir(&self.home)
        .stdin(Stdio::null());
        c
    }

    /// A directory the server may write.
    fn dir(&self, name: &str) -> PathBuf {
        let d = self.home.join(name);
        fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(NOBODY), Some(NOBODY)).unwrap();
        d
    }
}

/// sshd whose third key is authorized with the README's authorized_keys options, with
/// `snapveil` on the sessions' PATH and the test's config as SNAPVEIL_CONFIG.
fn sshd_for_pulls(setup: &Setup) -> Sshd {
    let line = readme_line("command=\"snapveil serve-pull home\"");
    let opts = line.split(" ssh-").next().unwrap();
    let bindir = setup.path("bin");
    fs::create_dir_all(&bindir).unwrap();
    std::os::unix::fs::symlink(bin(), bindir.join("snapveil")).unwrap();
    let jail = setup.path("rrsync-root");
    fs::create_dir_all(&jail).unwrap();
    Sshd::start_with(
        setup.work.path(),
        &jail,
        Some(opts),
        &[
            ("PATH", format!("{}:/usr/bin:/bin", bindir.display())),
            ("SNAPVEIL_CONFIG", setup.config.display().to_string()),
        ],
    )
}

/// The README's pull command with the server's backup directory for `/srv/backup/home/`.
fn readme_pull(dest: &Path) -> String {
    let line = readme_line("rsync -a --numeric-ids --delete root@client:/ /srv/backup/home/");
    line.replace("/srv/backup/home/", &format!("{}/", dest.display()))
}

fn status(setup: &Setup) -> serde_json::Value {
    let p = setup.state.join("status/home.json");
    serde_json::from_slice(&fs::read(&p).unwrap()).unwrap()
}

/// The forced-command pull: hooks run (their output never reaches rsync's stream), the
/// server gets the snapshot even though the live file changes during the pull, the copy
/// decrypts with stock gocryptfs, and nothing is left. Then the same key is refused for
/// a write, a path outside the view, a shell command, and no command at all.
#[test]
fn forced_command_pull_reads_a_snapshot_that_gocryptfs_decrypts() {
    let Some(b) = BtrfsLoop::new() else { return };
    assert!(require_tool("gocryptfs") && require_tool("setpriv"));
    let src = b.subvolume("data");
    write(&src, "a.txt", b"as it was at the snapshot\n");
    let big = random(300_000);
    write(&src, "dir/big", &big);
    write(&src, "root-only", b"secret\n");
    chmod(&src.join("root-only"), 0o600);
    let setup = Setup::new();
    let log = setup.path("hooks.log");
    let hook =
        |phase: &str, cmd: &str| format!("[[job.hooks]]\nphase = \"{phase}\"\ncommand = {cmd:?}\n");
    let hooks = [
        hook(
            "pre_snapshot",
            &format!("echo noise-pre; echo pre >> {}", log.display()),
        ),
        // Runs after the snapshot, while the pull is under way.
        hook(
            "post_snapshot",
            &format!(
                "echo noise-post; echo changed during the pull > {}; echo post >> {}",
                src.join("a.txt").display(),
                log.display()
            ),
        ),
        hook(
            "post_backup",
            &format!(
                "echo noise-done; echo $SNAPVEIL_RESULT >> {}",
                log.display()
            ),
        ),
    ]
    .concat();
    setup.home_job(&src, &hooks);
    let sshd = sshd_for_pulls(&setup);
    let server = Server::new(&setup, &sshd);
    let dest = server.dir("backup");

    let mut pull = server.sh(&readme_pull(&dest));
    let out = pull.output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        describe(&pull, &out),
        sshd.log()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("noise-pre"),
        "hook output goes to stderr: {stderr}"
    );

    assert_eq!(
        fs::read_to_string(src.join("a.txt")).unwrap(),
        "changed during the pull\n"
    );
    assert!(dest.join("gocryptfs.conf").exists());
    {
        let plain = gocryptfs_forward(&setup.pass, &dest, &setup.path("plain"));
        let p = plain.path();
        assert_eq!(
            fs::read_to_string(p.join("a.txt")).unwrap(),
            "as it was at the snapshot\n"
        );
        assert_eq!(fs::read(p.join("dir/big")).unwrap(), big);
        assert_eq!(fs::read_to_string(p.join("root-only")).unwrap(), "secret\n");
    }
    assert_eq!(fs::read_to_string(&log).unwrap(), "pre\npost\nsuccess\n");
    // rsnapshot's option set behind an ionice/nice --rsync-path is served as well.
    let dest2 = server.dir("rsnapshot");
    let mut pull = server.sh(&format!(
        "rsync -a --delete --numeric-ids --relative --delete-excluded \
         --rsync-path='ionice -c3 nice -n19 rsync' root@client:/ {}/",
        dest2.display()
    ));
    let out = pull.output().unwrap();
    assert!(out.status.success(), "{}", describe(&pull, &out));
    assert_eq!(
        fs::read(dest2.join("gocryptfs.conf")).unwrap(),
        fs::read(dest.join("gocryptfs.conf")).unwrap()
    );
    fs::write(&log, "").unwrap();
    let st = status(&setup);
    assert_eq!(st["result"], "success", "{st}");
    assert_eq!(st["consistent"], true, "{st}");
    let prom = fs::read_to_string(setup.state.join("snapveil.prom")).unwrap();
    assert!(
        prom.contains("snapveil_last_run_success{job=\"home\"} 1"),
        "{prom}"
    );
    setup.assert_clean("home", &b);

    // Refused: each names why, takes no snapshot, records no run.
    let before = fs::read(setup.state.join("status/home.json")).unwrap();
    fs::write(server.dir("up").join("f"), "x").unwrap();
    for (line, why) in [
        ("rsync -a up/ root@client:/x/", "without --server --sender"),
        ("rsync -a root@client:/../../etc/ up/", "leaves the view"),
        (
            "ssh client 'rsync --server --sender -logDtpre.iLsfxCIvu --remove-source-files . /'",
            "\"--remove-source-files\" is not allowed",
        ),
        ("ssh client cat /etc/shadow", "not an rsync pull: cat"),
        (
            "ssh client 'rsync --server --sender -r . /; id'",
            "shell syntax",
        ),
        ("ssh client", "no command"),
    ] {
        let mut c = server.sh(line);
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("refused") && err.contains(why),
            "{line}: expected a refusal naming {why:?}\n{}",
            describe(&c, &out)
        );
    }
    assert_eq!(
        fs::read(setup.state.join("status/home.json")).unwrap(),
        before
    );
    assert_eq!(
        fs::read_to_string(&log).unwrap(),
        "",
        "a refused request ran hooks"
    );
    setup.assert_clean("home", &b);
}

/// The server's rsync is killed half way (the connection drops): serve-pull stops its
/// rsync, unmounts, releases the snapshot and the lock, and records a failed run.
#[test]
fn killed_pull_leaves_no_snapshot_mount_or_lock() {
    let Some(b) = BtrfsLoop::new() else { return };
    let src = b.subvolume("data");
    write(&src, "big", &random(2 << 20));
    let setup = Setup::new();
    setup.home_job(&src, "");
    let sshd = sshd_for_pulls(&setup);
    let server = Server::new(&setup, &sshd);
    let dest = server.dir("backup");
    let mut c = server.sh(&format!(
        "exec rsync -a --bwlimit=200 root@client:/ {}/",
        dest.display()
    ));
    let mut child = c
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mp = setup.view_mountpoint("home");
    wait_for(30, "the pull's view to be mounted", || is_mounted(&mp));
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: kill(2) on the process group of the child we spawned.
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
    child.wait().unwrap();
    let st = setup.state.join("status/home.json");
    let waited = std::panic::catch_unwind(|| {
        wait_for(30, "serve-pull to record the failed pull", || st.exists())
    });
    if waited.is_err() {
        let ps = Command::new("ps")
            .args(["-eo", "pid,pgid,stat,args"])
            .output()
            .unwrap();
        panic!(
            "no status after the kill\n{}\n{}",
            String::from_utf8_lossy(&ps.stdout),
            sshd.log()
        );
    }
    wait_for(10, "the view to be unmounted", || !is_mounted(&mp));
    std::thread::sleep(Duration::from_millis(300));
    setup.assert_clean("home", &b);
    let st = status(&setup);
    assert_eq!(st["result"], "failure", "{st}");

    // SIGHUP to serve-pull itself (what a hung-up session may get): it stops its rsync
    // and cleans up the same way. Its pid: the parent of the fusermount3 that keeps
    // this test's (uniquely named) view mounted.
    fs::remove_file(setup.state.join("status/home.json")).unwrap();
    let mut child = server
        .sh(&format!(
            "exec rsync -a --bwlimit=200 root@client:/ {}/",
            dest.display()
        ))
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(30, "the second pull's view to be mounted", || {
        is_mounted(&mp)
    });
    let out = Command::new("pgrep")
        .args(["-f", "--"])
        .arg(&mp)
        .output()
        .unwrap();
    let fusermount: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect();
    assert_eq!(fusermount.len(), 1, "{fusermount:?}");
    let stat = fs::read_to_string(format!("/proc/{}/stat", fusermount[0])).unwrap();
    let ppid: i32 = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let cmdline = fs::read(format!("/proc/{ppid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("serve-pull"),
        "{ppid}"
    );
    // SAFETY: kill(2) with a pid read from /proc just now, checked to be serve-pull.
    unsafe {
        libc::kill(ppid, libc::SIGHUP);
    }
    assert!(!child.wait().unwrap().success(), "the pull survived SIGHUP");
    let st = setup.state.join("status/home.json");
    wait_for(30, "serve-pull to record the interrupted pull", || {
        st.exists()
    });
    std::thread::sleep(Duration::from_millis(300));
    setup.assert_clean("home", &b);
    let st = status(&setup);
    assert_eq!(st["result"], "failure", "{st}");
    assert!(st["error"].as_str().unwrap().contains("SIGHUP"), "{st}");
}

/// Kills the mount daemons of this test (their command line names `mp`), by pid.
struct Daemons<'a> {
    mp: &'a Path,
}

impl Drop for Daemons<'_> {
    fn drop(&mut self) {
        let out = Command::new("pgrep")
            .args(["-f", "--"])
            .arg(self.mp)
            .output()
            .unwrap();
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").arg(pid).status();
        }
    }
}

/// fstab and `mount -t` as the README shows them, the helper name the package installs,
/// and the unit `snapveil mount-unit` prints, each mounted by mount(8) in a private mount
/// namespace; pulled with rsync by nobody through `force_owner`; `umount` ends the
/// daemon; the mount point and the key directory inside the source never show.
#[test]
fn fstab_mount_with_force_owner_is_pulled_by_an_unprivileged_user() {
    assert!(require_tool("unshare") && require_tool("setpriv") && require_tool("findmnt"));
    let setup = Setup::new();
    chmod(setup.work.path(), 0o711);
    // `root` plays `/` of the README's lines.
    let root = setup.path("root");
    let keys = root.join(".nobackup");
    fs::create_dir_all(&keys).unwrap();
    chmod(&keys, 0o700);
    crate::util::init_key(&keys.join("root.conf"), &keys.join("root.pass"));
    write(&root, "etc/hostname", b"client\n");
    write(&root, "root/secret", b"root only\n");
    chmod(&root.join("root/secret"), 0o600);
    chmod(&root.join("root"), 0o700);
    write(&root, "var/tmp/junk", b"excluded\n");
    let mp = root.join("srv/snapveil-pull/root");
    fs::create_dir_all(&mp).unwrap();
    let _daemons = Daemons { mp: &mp };
    let subst = |s: &str| {
        s.replace("/.nobackup/", &format!("{}/", keys.display()))
            .replace("998:998", "65534:65534")
            .replace(" /srv/snapveil-pull/root", &format!(" {}", mp.display()))
            .replace(" / ", &format!(" {} ", root.display()))
    };
    let fstab = setup.path("fstab");
    let line = readme_line("/ /srv/snapveil-pull/root fuse.snapveil ");
    fs::write(&fstab, subst(&format!(" {line}")).trim_start()).unwrap();
    let mount_t = subst(&readme_line("mount -t fuse.snapveil "));
    // The unit, for a dir: job on the same tree.
    setup.write_config(&[format!(
        "[[job]]\nname = \"home\"\nsource = \"dir:{}\"\ntarget = \"{}\"\nkey_config = \"{}\"\n\
         passfile = \"{}\"\nexcludes = [\"/var/tmp/\"]\n",
        root.display(),
        setup.path("target").display(),
        keys.join("root.conf").display(),
        keys.join("root.pass").display()
    )]);
    let unit_line = readme_line("snapveil mount-unit home ");
    let words: Vec<String> = subst(&unit_line)
        .split_whitespace()
        .skip(1)
        .map(|w| w.replace("/srv/snapveil-pull/home", &mp.display().to_string()))
        .collect();
    let unit = ok(Command::new(bin())
        .args(&words)
        .arg("--config")
        .arg(&setup.config));
    let field = |k: &str| {
        unit.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k}= in\n{unit}"))
            .to_string()
    };
    assert_eq!(field("Where"), mp.display().to_string());
    let first = unit.lines().next().unwrap();
    assert!(
        first.starts_with("# ") && first.contains(".mount: install as /etc/systemd/system/"),
        "{unit}"
    );
    // mount(8) looks for helpers in /sbin only and runs them with a fixed PATH:
    // in the namespace, /usr/local/sbin holds `snapveil` for mount.fuse3 to find.
    let helpers = setup.path("helpers");
    fs::create_dir_all(&helpers).unwrap();
    std::os::unix::fs::symlink(bin(), helpers.join("snapveil")).unwrap();
    std::os::unix::fs::symlink(bin(), helpers.join("mount.fuse.snapveil")).unwrap();
    let out_dir = setup.path("out");
    fs::create_dir_all(&out_dir).unwrap();
    let dest = setup.path("dest");
    fs::create_dir_all(&dest).unwrap();
    std::os::unix::fs::chown(&dest, Some(NOBODY), Some(NOBODY)).unwrap();
    let script = r#"
        set -e
        gone() { for i in $(seq 100); do pgrep -f -- "$MP" >/dev/null || return 0; sleep 0.1; done; echo "daemon still running after umount" >&2; return 1; }
        mount --bind "$HELPERS" /usr/local/sbin
        # An installed package's helper link must not stand in for the binary under test.
        if [ -e /sbin/mount.fuse.snapveil ]; then mount --bind "$HELPERS/snapveil" /sbin/mount.fuse.snapveil; fi
        mount -T "$FSTAB" "$MP"
        findmnt -n -o FSTYPE,SOURCE "$MP" > "$OUT/fstab.findmnt"
        find "$MP" -mindepth 1 -printf '%U:%G\n' | sort -u > "$OUT/owners"
        setpriv --reuid=65534 --regid=65534 --clear-groups rsync -a "$MP/" "$DEST/"
        umount "$MP"; gone
        eval "$MOUNT_T"
        findmnt -n -o FSTYPE "$MP" > "$OUT/mount-t.findmnt"
        umount "$MP"; gone
        "$HELPERS/mount.fuse.snapveil" "$ROOT" "$MP" -o "rw,config=$KEYS/root.conf,passfile=$KEYS/root.pass"
        findmnt -n -o FSTYPE "$MP" > "$OUT/helper.findmnt"
        umount "$MP"; gone
        if mount -t fuse.snapveil -o "config=$KEYS/root.conf,passfile=$KEYS/root.pass,reverse" "$ROOT" "$MP" 2> "$OUT/unknown.err"; then
            echo "an unknown option was accepted" >&2; exit 1
        fi
        mount "$UNIT_WHAT" "$UNIT_WHERE" -t "$UNIT_TYPE" -o "$UNIT_OPTIONS"
        findmnt -n -o FSTYPE,SOURCE "$MP" > "$OUT/unit.findmnt"
        umount "$MP"; gone
    "#;
    let mut c = Command::new("timeout");
    c.args([
        "120",
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "bash",
        "-c",
        script,
    ])
    .env("MP", &mp)
    .env("ROOT", &root)
    .env("KEYS", &keys)
    .env("FSTAB", &fstab)
    .env("MOUNT_T", &mount_t)
    .env("HELPERS", &helpers)
    .env("OUT", &out_dir)
    .env("DEST", &dest)
    .env("UNIT_WHAT", field("What"))
    .env("UNIT_WHERE", field("Where"))
    .env("UNIT_TYPE", field("Type"))
    .env("UNIT_OPTIONS", field("Options"));
    ok(&mut c);
    let read = |n: &str| fs::read_to_string(out_dir.join(n)).unwrap();
    assert_eq!(
        read("fstab.findmnt").split_whitespace().collect::<Vec<_>>(),
        ["fuse.snapveil", "snapveil-root"]
    );
    assert_eq!(read("owners"), "65534:65534\n");
    assert_eq!(read("mount-t.findmnt").trim(), "fuse.snapveil");
    assert_eq!(read("helper.findmnt").trim(), "fuse.snapveil");
    assert_eq!(
        read("unit.findmnt").split_whitespace().collect::<Vec<_>>(),
        ["fuse.snapveil", "snapveil-home"]
    );
    assert!(
        read("unknown.err").contains("unknown option \"reverse\""),
        "{}",
        read("unknown.err")
    );
    assert!(!is_mounted(&mp));

    // What nobody pulled: everything but the excluded, the keys and the mount point.
    let plain = setup.path("plain");
    ok(Command::new(bin())
        .args(["decrypt", "--config"])
        .arg(keys.join("root.conf"))
        .arg("--passfile")
        .arg(keys.join("root.pass"))
        .arg(&dest)
        .arg(&plain));
    assert_eq!(
        fs::read_to_string(plain.join("etc/hostname")).unwrap(),
        "client\n"
    );
    assert_eq!(
        fs::read_to_string(plain.join("root/secret")).unwrap(),
        "root only\n"
    );
    assert!(
        !plain.join(".nobackup").exists(),
        "the key directory is in the view"
    );
    assert!(
        !plain.join("var/tmp").exists(),
        "exclude=/var/tmp/ was ignored"
    );
    assert!(plain.join("srv/snapveil-pull").is_dir());
    assert!(
        !plain.join("srv/snapveil-pull/root").exists(),
        "the view shows its own mount point"
    );
}

/// What `packaging/pull/` ships is what the README shows and what `mount-unit` prints
/// (for a job `home` with the example's key paths), and the unit passes systemd-analyze.
#[test]
fn packaged_pull_examples_match_the_readme_and_mount_unit() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/pull");
    let last = |f: &str| {
        let t = fs::read_to_string(dir.join(f)).unwrap();
        t.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(
        last("fstab.example"),
        readme_line("/ /srv/snapveil-pull/root fuse.snapveil ")
    );
    assert_eq!(
        last("authorized_keys.example"),
        readme_line("command=\"snapveil serve-pull home\"")
    );
    let setup = Setup::new();
    setup.write_config(&[setup.job(
        "home",
        "btrfs:/home",
        "/mnt/backup/home",
        "excludes = [\"*.tmp\", \"/.cache/\"]",
    )]);
    let unit = ok(Command::new(bin())
        .args([
            "mount-unit",
            "home",
            "--where",
            "/srv/snapveil-pull/home",
            "--force-owner",
            "998:998",
            "--config",
        ])
        .arg(&setup.config))
    .replace(
        &setup.key.display().to_string(),
        "/etc/snapveil/keys/home.conf",
    )
    .replace(
        &setup.pass.display().to_string(),
        "/etc/snapveil/keys/home.pass",
    );
    let shipped = fs::read_to_string(dir.join("home.mount.example")).unwrap();
    assert_eq!(unit, shipped, "packaging/pull/home.mount.example is stale");
    if require_tool("systemd-analyze") {
        let name = "srv-snapveil\\x2dpull-home.mount";
        assert!(unit.starts_with(&format!("# {name}: install as /etc/systemd/system/{name}")));
        let p = setup.path(name);
        fs::write(&p, &unit).unwrap();
        ok(Command::new("systemd-analyze").arg("verify").arg(&p));
    }
}
