//! What ships beside the binary: the example config parses with every option it shows,
//! the hook scripts speak their protocols (against recording stand-ins for mysql, psql,
//! pg_dumpall and fsfreeze: no database server runs here), a held hook works through a
//! real `snapveil run`, and the systemd units say what the README promises.

use crate::util::{bin, ok};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn script(path: &Path, body: &str) {
    fs::write(path, body).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// A PATH dir with recording stand-ins; each appends its argv and stdin lines to LOG.
fn fakes(dir: &Path, log: &Path) -> String {
    fs::create_dir_all(dir).unwrap();
    let log = log.display();
    script(
        &dir.join("mysql"),
        &format!(
            "#!/bin/sh\necho \"mysql $*\" >>{log}\necho $$ >{log}.mysql-pid\nwhile IFS= read -r l; do\n  echo \"sql: $l\" >>{log}\n  case $l in\n    *\"SELECT 'snapveil-locked'\"*) echo snapveil-locked;;\n    *\"SELECT 'snapveil-unlocked'\"*) echo snapveil-unlocked;;\n  esac\ndone\necho \"mysql exit\" >>{log}\n"
        ),
    );
    script(
        &dir.join("psql"),
        &format!("#!/bin/sh\necho \"psql $*\" >>{log}\n"),
    );
    script(
        &dir.join("pg_dumpall"),
        &format!("#!/bin/sh\necho \"pg_dumpall $*\" >>{log}\necho '-- dump'\n"),
    );
    script(
        &dir.join("pg_dump"),
        &format!("#!/bin/sh\necho \"pg_dump $*\" >>{log}\necho '-- one db'\n"),
    );
    script(
        &dir.join("fsfreeze"),
        &format!("#!/bin/sh\necho \"fsfreeze $*\" >>{log}\n"),
    );
    format!("{}:{}", dir.display(), std::env::var("PATH").unwrap())
}

fn hook(name: &str) -> PathBuf {
    repo().join("hooks").join(name)
}

/// The example config, with its key and hook paths pointed at real files, has no errors.
#[test]
fn example_config_checks_clean() {
    let work = tempfile::tempdir().unwrap();
    let text = fs::read_to_string(repo().join("examples/snapveil.toml")).unwrap();
    let keys = work.path().join("keys");
    fs::create_dir(&keys).unwrap();
    for name in ["db", "pg", "www", "etc", "vms", "pgraw"] {
        let (conf, pass) = (format!("{name}.conf"), format!("{name}.pass"));
        crate::util::init_key(&keys.join(conf), &keys.join(pass));
    }
    // The raw ZFS jobs' age identity and passphrase files (private, as required).
    for name in ["vms.age", "pgraw.age-pass"] {
        fs::write(keys.join(name), "secret\n").unwrap();
        fs::set_permissions(
            keys.join(name),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
    }
    let text = text
        .replace("/etc/snapveil/keys/", &format!("{}/", keys.display()))
        .replace(
            "/usr/share/snapveil/hooks/",
            &format!("{}/", repo().join("hooks").display()),
        );
    let cfg = work.path().join("snapveil.toml");
    fs::write(&cfg, text).unwrap();
    let out = ok(Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&cfg));
    assert!(
        out.contains("OK, 7 job(s): db, pg, www, etc, vms, pgraw, db-replica"),
        "{out}"
    );
}

/// Every field the config parser accepts (the serde structs of src/config/raw.rs and the
/// `[job.snapshot]` table) is shown in the example, so a new option cannot go undocumented.
#[test]
fn example_config_shows_every_option_the_parser_accepts() {
    fn keys(v: &toml::Value, out: &mut std::collections::BTreeSet<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    out.insert(k.clone());
                    keys(v, out);
                }
            }
            toml::Value::Array(a) => a.iter().for_each(|v| keys(v, out)),
            _ => {}
        }
    }
    let example: toml::Value =
        toml::from_str(&fs::read_to_string(repo().join("examples/snapveil.toml")).unwrap())
            .unwrap();
    let mut shown = std::collections::BTreeSet::new();
    keys(&example, &mut shown);
    let raw = fs::read_to_string(repo().join("src/config/raw.rs")).unwrap();
    let snap = fs::read_to_string(repo().join("src/snapshot/mod.rs")).unwrap();
    let snap = &snap[snap.find("pub struct SnapshotOptions").unwrap()..];
    let snap = &snap[..snap.find("\n}").unwrap()];
    let fields: Vec<&str> = raw
        .lines()
        .chain(snap.lines())
        .filter_map(|l| l.trim().strip_prefix("pub "))
        .filter_map(|l| l.split_once(':').map(|(name, _)| name))
        .filter(|name| name.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    assert!(fields.len() > 40, "parsed the field lists: {fields:?}");
    let missing: Vec<&&str> = fields.iter().filter(|f| !shown.contains(**f)).collect();
    assert!(
        missing.is_empty(),
        "not shown in examples/snapveil.toml: {missing:?}"
    );
}

/// mysql-flush-lock: one session takes the lock, READY only after the lock answered,
/// holds until stdin closes, then unlocks in the same session.
#[test]
fn mysql_hook_holds_the_lock_in_one_session_until_stdin_closes() {
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("log");
    let path = fakes(&work.path().join("bin"), &log);
    let mut child = Command::new(hook("mysql-flush-lock"))
        .arg("--defaults-file=/etc/test.cnf")
        .env("PATH", &path)
        .env("SNAPVEIL_MYSQL", "mysql")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "READY\n");
    let held = fs::read_to_string(&log).unwrap();
    assert!(
        held.contains("sql: FLUSH TABLES WITH READ LOCK;") && !held.contains("UNLOCK"),
        "locked and holding: {held}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "still holding");
    child.stdin.take().unwrap().flush().unwrap(); // drop closes stdin
    let st = child.wait().unwrap();
    assert!(st.success());
    let all = fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("mysql --")).count(),
        1,
        "one session: {all}"
    );
    assert!(lines[0].contains("--defaults-file=/etc/test.cnf"), "{all}");
    let lock = lines
        .iter()
        .position(|l| l.contains("FLUSH TABLES"))
        .unwrap();
    let unlock = lines
        .iter()
        .position(|l| l.contains("UNLOCK TABLES"))
        .unwrap();
    assert!(
        lock < unlock && lines.last() == Some(&"mysql exit"),
        "{all}"
    );
}

/// A client that fails (wrong credentials) makes the hook fail before READY.
#[test]
fn mysql_hook_fails_without_ready_when_the_client_fails() {
    let work = tempfile::tempdir().unwrap();
    let bin_dir = work.path().join("bin");
    fs::create_dir_all(&bin_dir).unwrap();
    script(
        &bin_dir.join("mysql"),
        "#!/bin/sh\necho 'ERROR 1045 (28000): Access denied'\nexit 1\n",
    );
    let out = Command::new(hook("mysql-flush-lock"))
        .env(
            "PATH",
            format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap()),
        )
        .env("SNAPVEIL_MYSQL", "mysql")
        .env("SNAPVEIL_MYSQL_LOCK_TIMEOUT", "5")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("READY"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Access denied"));
}

/// postgresql: checkpoint runs CHECKPOINT; dump writes the file whole, via a temp name.
#[test]
fn postgresql_hook_checkpoint_and_atomic_dump() {
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("log");
    let path = fakes(&work.path().join("bin"), &log);
    let run = |args: &[&str]| {
        let o = Command::new(hook("postgresql"))
            .args(args)
            .env("PATH", &path)
            .env("SNAPVEIL_PG_USER", "")
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
    };
    run(&["checkpoint", "-p", "5433"]);
    let dump = work.path().join("data/pg.sql");
    fs::create_dir_all(dump.parent().unwrap()).unwrap();
    run(&["dump", dump.to_str().unwrap(), "--clean"]);
    let all = fs::read_to_string(&log).unwrap();
    assert!(
        all.contains("psql -X -q -v ON_ERROR_STOP=1 -c CHECKPOINT -p 5433"),
        "{all}"
    );
    assert!(all.contains("pg_dumpall --clean"), "{all}");
    assert_eq!(fs::read_to_string(&dump).unwrap(), "-- dump\n");
    assert!(!dump.with_extension("sql.tmp").exists());
    let one = work.path().join("data/shop.dump");
    run(&["dump-db", "shop", one.to_str().unwrap(), "-Fc"]);
    let all = fs::read_to_string(&log).unwrap();
    assert!(all.contains("pg_dump -Fc -- shop"), "{all}");
    assert_eq!(fs::read_to_string(&one).unwrap(), "-- one db\n");
    // A dump that fails half-way leaves the previous dump alone and no temp file.
    let bin_dir = work.path().join("failing");
    fs::create_dir_all(&bin_dir).unwrap();
    script(
        &bin_dir.join("pg_dumpall"),
        "#!/bin/sh\necho '-- half'\necho 'pg_dumpall: connection lost' >&2\nexit 1\n",
    );
    let failed = Command::new(hook("postgresql"))
        .args(["dump", dump.to_str().unwrap()])
        .env("PATH", format!("{}:{path}", bin_dir.display()))
        .env("SNAPVEIL_PG_USER", "")
        .output()
        .unwrap();
    assert!(!failed.status.success());
    assert_eq!(fs::read_to_string(&dump).unwrap(), "-- dump\n");
    assert!(!dump.with_extension("sql.tmp").exists());
    let bad = Command::new(hook("postgresql"))
        .arg("vacuum")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

/// Waits for `child` at most `secs` seconds (stdin stays as the caller left it: `Child::wait`
/// would close it, which is exactly the EOF a SIGTERM test must not send).
fn wait_at_most(child: &mut std::process::Child, secs: u64) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// mysql-flush-lock killed while holding (stdin still open): it exits at once and the client
/// session, and with it the lock, ends.
#[test]
fn mysql_hook_ends_the_session_on_sigterm() {
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("log");
    let path = fakes(&work.path().join("bin"), &log);
    let mut child = Command::new(hook("mysql-flush-lock"))
        .env("PATH", &path)
        .env("SNAPVEIL_MYSQL", "mysql")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let _stdin = child.stdin.take().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "READY\n");
    let client: i32 = fs::read_to_string(log.with_extension("mysql-pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = wait_at_most(&mut child, 10);
    assert!(!st.success());
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{client}")).exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the client session (pid {client}) outlived the hook");
}

/// fsfreeze: freezes, READY, thaws on EOF, and also thaws when killed by a timeout.
#[test]
fn fsfreeze_hook_thaws_on_eof_and_on_sigterm() {
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("log");
    let path = fakes(&work.path().join("bin"), &log);
    for kill in [false, true] {
        let _ = fs::remove_file(&log);
        let mut child = Command::new(hook("fsfreeze"))
            .arg("/proc")
            .env("PATH", &path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "READY\n");
        assert_eq!(fs::read_to_string(&log).unwrap(), "fsfreeze -f /proc\n");
        let stdin = child.stdin.take();
        if kill {
            // SIGTERM to the hook alone, stdin still open: the trap must thaw at once,
            // not when EOF comes.
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        } else {
            drop(stdin);
        }
        wait_at_most(&mut child, 10);
        assert_eq!(
            fs::read_to_string(&log).unwrap(),
            "fsfreeze -f /proc\nfsfreeze -u /proc\n",
            "thawed (killed: {kill})"
        );
    }
    let not_mp = Command::new(hook("fsfreeze"))
        .arg(work.path())
        .env("PATH", &path)
        .output()
        .unwrap();
    assert!(!not_mp.status.success());
}

/// The held mysql hook through a real run: the lock is taken before the (dir:) source is
/// read and released after; the run succeeds.
#[test]
fn held_mysql_hook_in_a_real_run() {
    let work = tempfile::tempdir().unwrap();
    let log = work.path().join("log");
    let path = fakes(&work.path().join("bin"), &log);
    let src = work.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("table.ibd"), b"rows").unwrap();
    let key = work.path().join("k.conf");
    let pass = work.path().join("k.pass");
    crate::util::init_key(&key, &pass);
    let cfg = work.path().join("c.toml");
    fs::write(
        &cfg,
        format!(
            "state_dir = {st:?}\n[[job]]\nname = \"db\"\nsource = \"dir:{src}\"\ntarget = {t:?}\n\
             key_config = {key:?}\npassfile = {pass:?}\n\
             [[job.hooks]]\nphase = \"pre_snapshot\"\ncommand = [{hook:?}]\nheld = true\ntimeout = \"20s\"\n\
             [[job.hooks]]\nphase = \"post_snapshot\"\ncommand = \"echo post_snapshot >>{log}\"\n",
            st = work.path().join("state").display().to_string(),
            src = src.display(),
            t = work.path().join("target").display().to_string(),
            key = key.display().to_string(),
            pass = pass.display().to_string(),
            hook = hook("mysql-flush-lock").display().to_string(),
            log = log.display(),
        ),
    )
    .unwrap();
    ok(Command::new(bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .env("PATH", &path)
        .env("SNAPVEIL_MYSQL", "mysql"));
    let all = fs::read_to_string(&log).unwrap();
    let pos = |s: &str| {
        all.find(s)
            .unwrap_or_else(|| panic!("{s:?} missing in:\n{all}"))
    };
    assert!(pos("FLUSH TABLES") < pos("UNLOCK TABLES"));
    assert!(
        pos("UNLOCK TABLES") < pos("post_snapshot"),
        "released right after the snapshot, before post_snapshot hooks:\n{all}"
    );
    assert!(work.path().join("target/current/gocryptfs.conf").exists());
}

/// The units run `snapveil run` nightly, catch up after downtime, and spread the load.
#[test]
fn systemd_units_say_what_the_readme_promises() {
    let p = repo().join("packaging/systemd");
    let service = fs::read_to_string(p.join("snapveil.service")).unwrap();
    let timer = fs::read_to_string(p.join("snapveil.timer")).unwrap();
    let tservice = fs::read_to_string(p.join("snapveil@.service")).unwrap();
    let ttimer = fs::read_to_string(p.join("snapveil@.timer")).unwrap();
    assert!(service.contains("ExecStart=/usr/bin/snapveil run\n"));
    assert!(service.contains("Type=oneshot"));
    assert!(tservice.contains("ExecStart=/usr/bin/snapveil run %i\n"));
    // Any of these gives the unit a mount namespace of its own: a run's view and snapshot
    // mounts would be invisible to the host (found under systemd in tests/vm/70-systemd.sh).
    for unit in [&service, &tservice] {
        for line in unit.lines() {
            for key in [
                "Protect",
                "Private",
                "ReadOnlyPaths",
                "ReadWritePaths",
                "InaccessiblePaths",
                "TemporaryFileSystem",
                "BindPaths",
                "BindReadOnlyPaths",
                "MountFlags",
            ] {
                assert!(
                    !line.starts_with(key),
                    "{line}: puts the unit's mounts in a namespace of its own"
                );
            }
        }
    }
    for t in [&timer, &ttimer] {
        assert!(t.contains("Persistent=true"));
        assert!(t.contains("RandomizedDelaySec="));
        assert!(t.contains("OnCalendar="));
    }
    if crate::util::require_tool("systemd-analyze") {
        // Templates verify only as instances: copies named snapveil@demo.*.
        let inst = tempfile::tempdir().unwrap();
        for (from, to) in [
            ("snapveil.service", "snapveil.service"),
            ("snapveil.timer", "snapveil.timer"),
            ("snapveil@.service", "snapveil@demo.service"),
            ("snapveil@.timer", "snapveil@demo.timer"),
        ] {
            fs::copy(p.join(from), inst.path().join(to)).unwrap();
        }
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .args(
                [
                    "snapveil.service",
                    "snapveil.timer",
                    "snapveil@demo.service",
                    "snapveil@demo.timer",
                ]
                .iter()
                .map(|f| inst.path().join(f)),
            )
            .output()
            .unwrap();
        // Not installed here: the binary and the man page; everything else must verify
        // (parse warnings name the file by its path, so match "snapveil" anywhere).
        let err = String::from_utf8_lossy(&out.stderr);
        let bad: Vec<&str> = err
            .lines()
            .filter(|l| l.contains("snapveil"))
            .filter(|l| !l.contains("/usr/bin/snapveil is not executable"))
            .filter(|l| !l.contains("Command 'man snapveil(8)'"))
            .collect();
        assert!(bad.is_empty(), "{err}");
    }
}

/// The Debian package carries the binary (stripped), units, hooks, a man page per
/// subcommand, completions and the example config; lintian (run by build-deb.sh) reports
/// no error or warning; the config is a conffile; the key and state directories are made
/// by postinst, not shipped, and no maintainer script deletes them.
#[test]
fn debian_package_passes_lintian_and_ships_pages_completions_conffile() {
    use clap::CommandFactory;
    let out_dir = tempfile::tempdir().unwrap();
    let deb = ok(Command::new(repo().join("scripts/build-deb.sh"))
        .arg(out_dir.path())
        .env("SNAPVEIL_BIN", bin())
        .env("SNAPVEIL_DEB_COMPRESS", "gzip"));
    let deb = deb.trim();
    let list = ok(Command::new("dpkg-deb").args(["-c", deb]));
    let mut want: Vec<String> = [
        "./usr/bin/snapveil",
        "./lib/systemd/system/snapveil.service",
        "./lib/systemd/system/snapveil.timer",
        "./lib/systemd/system/snapveil@.service",
        "./lib/systemd/system/snapveil@.timer",
        "./usr/share/snapveil/hooks/mysql-flush-lock",
        "./usr/share/snapveil/hooks/postgresql",
        "./usr/share/snapveil/hooks/fsfreeze",
        "./usr/share/man/man8/snapveil.8.gz",
        "./usr/share/bash-completion/completions/snapveil",
        "./usr/share/zsh/vendor-completions/_snapveil",
        "./usr/share/fish/vendor_completions.d/snapveil.fish",
        "./usr/share/doc/snapveil/examples/snapveil.toml",
        "./usr/share/doc/snapveil/examples/pull/fstab.example",
        "./usr/share/doc/snapveil/examples/pull/home.mount.example",
        "./usr/share/doc/snapveil/examples/pull/authorized_keys.example",
        "./usr/sbin/mount.fuse.snapveil -> ../bin/snapveil",
        "./usr/share/doc/snapveil/changelog.Debian.gz",
        "./usr/share/doc/snapveil/copyright",
        "./etc/snapveil/snapveil.toml",
    ]
    .map(String::from)
    .to_vec();
    // one page per subcommand the binary has, whoever added it
    for sub in snapveil::cli::Cli::command()
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
    {
        want.push(format!(
            "./usr/share/man/man8/snapveil-{}.8.gz",
            sub.get_name()
        ));
    }
    for want in &want {
        assert!(
            list.lines().any(|l| l.ends_with(want.as_str())),
            "{want} missing:\n{list}"
        );
    }
    assert!(
        !list.contains("./etc/snapveil/keys") && !list.contains("./var/lib"),
        "private dirs must come from postinst:\n{list}"
    );
    assert!(
        list.contains("-rwxr-xr-x root/root")
            && list.contains("./usr/share/snapveil/hooks/fsfreeze")
    );
    let info = ok(Command::new("dpkg-deb").args(["-f", deb, "Package", "Depends"]));
    assert!(
        info.contains("Package: snapveil") && info.contains("fuse3"),
        "{info}"
    );

    let x = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb").args(["-R", deb]).arg(x.path()));
    let bin_in = x.path().join("usr/bin/snapveil");
    let sections = ok(Command::new("readelf").arg("-S").arg(&bin_in));
    assert!(
        !sections.contains(".debug_info") && !sections.contains(" .symtab "),
        "not stripped:\n{sections}"
    );
    let conffiles = fs::read_to_string(x.path().join("DEBIAN/conffiles")).unwrap();
    assert_eq!(conffiles, "/etc/snapveil/snapveil.toml\n");
    ok(Command::new(bin())
        .args(["check-config", "--config"])
        .arg(x.path().join("etc/snapveil/snapveil.toml")));
    let postinst = fs::read_to_string(x.path().join("DEBIAN/postinst")).unwrap();
    assert!(
        postinst.contains("install -d -m 0700 /etc/snapveil/keys"),
        "{postinst}"
    );
    let postrm = fs::read_to_string(x.path().join("DEBIAN/postrm")).unwrap();
    assert!(
        !postrm.contains("rm ") && postrm.contains("purge leaves"),
        "{postrm}"
    );
    let copyright = fs::read_to_string(x.path().join("usr/share/doc/snapveil/copyright")).unwrap();
    assert!(copyright.starts_with(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
    ));
    // crates linked in, with a stand-alone paragraph for each licence named
    for crate_ in [
        "rust-crates/clap_builder-",
        "rust-crates/fuser-",
        "rust-crates/aes-siv-",
    ] {
        assert!(copyright.contains(crate_), "{crate_} missing in copyright");
    }
    for licence in ["Expat", "Apache-2.0", "Unlicense", "BSD-3-Clause"] {
        assert!(
            copyright.contains(&format!("\n\nLicense: {licence}\n")),
            "no License: {licence} paragraph"
        );
    }
}
