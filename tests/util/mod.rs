//! Shared helpers for integration tests: running the binary, guards for real system
//! parts (FUSE mounts, loop devices, pools, sshd) that clean up even when a test fails.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_snapveil"))
}

/// Test material kept in the repository: `vectors/gocryptfs-reverse` is a copy of the
/// known-answer vectors made with the real gocryptfs binary (shared/vectors), so a clean
/// clone tests on its own.
pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests")
}

/// Runs a command and prints everything about it when it did not do what was expected.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    out
}

pub fn describe(cmd: &Command, out: &Output) -> String {
    format!(
        "command: {cmd:?}\nstatus: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs and asserts success, returning stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "expected success\n{}",
        describe(cmd, &out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs and asserts failure, returning stderr.
pub fn fails(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        !out.status.success(),
        "expected failure\n{}",
        describe(cmd, &out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Fails the test with a clear message when a required tool is missing, unless
/// SNAPVEIL_TEST_SKIP_MISSING=1 is set (never in CI): a silent skip would pass vacuously.
pub fn require_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    found || missing(&format!("{tool} is not installed: run `make deps`"))
}

/// What a test does when something it needs is not here (`what`, with what to do):
/// fails, unless SNAPVEIL_TEST_SKIP_MISSING=1 is set (never in CI), when it says so and
/// returns false for the test to return.
pub fn missing(what: &str) -> bool {
    if std::env::var("SNAPVEIL_TEST_SKIP_MISSING").as_deref() == Ok("1") {
        eprintln!("SKIP: {what}");
        return false;
    }
    panic!("{what} (or set SNAPVEIL_TEST_SKIP_MISSING=1 locally)");
}

/// The README, whose command lines tests run as written.
pub fn readme() -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .unwrap()
}

pub mod fuse;
pub mod rsyncd;
pub mod setup;
pub mod sshd;
pub mod tree;

/// `snapveil init` with a fast scrypt (`--scrypt-n 10`): a new key config and passfile.
pub fn init_key(config: &std::path::Path, passfile: &std::path::Path) {
    init_key_with(&[], config, passfile);
}

/// [`init_key`] with `flags` (e.g. `--plaintext-names`) right after `init`.
pub fn init_key_with(flags: &[&str], config: &std::path::Path, passfile: &std::path::Path) {
    ok(Command::new(bin())
        .arg("init")
        .args(flags)
        .args(["--scrypt-n", "10", "--config"])
        .arg(config)
        .arg("--passfile")
        .arg(passfile));
}

/// The stamps of a target's restore points (`runs/<stamp>.json`, not prune's
/// `runs/pruned.json`), oldest first.
pub fn run_stamps(target: &std::path::Path) -> Vec<String> {
    let mut runs: Vec<String> = std::fs::read_dir(target.join("runs"))
        .unwrap()
        .map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .replace(".json", "")
        })
        .filter(|r| r != "pruned")
        .collect();
    runs.sort();
    runs
}

/// Makes a target look as an older snapveil (before sealed records, issue 14) left it:
/// the seal line of every run record, prune's ledger and the agent's chain state go.
pub fn as_made_by_older_snapveil(target: &std::path::Path, state_dir: &std::path::Path) {
    for s in run_stamps(target) {
        let p = target.join("runs").join(format!("{s}.json"));
        let data = std::fs::read_to_string(&p).unwrap();
        let body: String = data
            .lines()
            .filter(|l| !l.starts_with("snapveil-mac-v1 "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_ne!(body, data, "{} had no seal", p.display());
        std::fs::write(&p, body).unwrap();
    }
    let _ = std::fs::remove_file(target.join("runs/pruned.json"));
    let _ = std::fs::remove_dir_all(state_dir.join("chain"));
}

/// A private copy of a file (mode 0600), as snapveil requires for key material.
pub fn private_copy(src: &std::path::Path, dst: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(src, dst)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", src.display(), dst.display()));
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Writes a passfile with mode 0600.
pub fn passfile(path: &std::path::Path, password: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("{password}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}
pub mod btrfs;
pub mod zfs;
