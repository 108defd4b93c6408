//! The exit-code policy (issue 12), for every command that takes a config: 2 for a
//! config that does not load and for an unknown job name, with a message naming the file
//! or the job, and nothing attempted; 2 for a bad `--as-of` or `--keep-*`. The policy is
//! written in the man page's EXIT STATUS section, checked here too. (`snapshot` takes no
//! config: `--source`/`--job` only.)

use crate::util::{bin, describe};
use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

struct Setup {
    work: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    /// A key, a source directory, and a valid config with the one job `data`.
    fn new() -> Setup {
        let work = tempfile::Builder::new()
            .prefix("snapveil-exit-")
            .tempdir()
            .unwrap();
        let p = |r: &str| work.path().join(r);
        fs::create_dir(p("keys")).unwrap();
        fs::create_dir(p("src")).unwrap();
        fs::write(p("src/f"), b"x").unwrap();
        let mut init = Command::new(bin());
        init.args(["init", "--scrypt-n", "10", "--config"])
            .arg(p("keys/key.conf"))
            .arg("--passfile")
            .arg(p("keys/key.pass"));
        let o = init.output().unwrap();
        assert!(o.status.success(), "{}", describe(&init, &o));
        let config = p("snapveil.toml");
        let s = Setup { work, config };
        s.write_config(&s.valid());
        s
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.work.path().join(rel)
    }

    fn valid(&self) -> String {
        format!(
            "state_dir = {:?}\n\n[[job]]\nname = \"data\"\nsource = {:?}\ntarget = {:?}\n\
             key_config = {:?}\npassfile = {:?}\n",
            self.path("state"),
            format!("dir:{}", self.path("src").display()),
            self.path("target"),
            self.path("keys/key.conf"),
            self.path("keys/key.pass"),
        )
    }

    fn write_config(&self, text: &str) {
        fs::write(&self.config, text).unwrap();
    }

    /// `snapveil ARGS --config CONFIG`: the output, after asserting exit 2.
    fn usage_error(&self, args: &[&str]) -> String {
        let mut c = Command::new(bin());
        c.args(args).arg("--config").arg(&self.config);
        exit_2(&mut c)
    }
}

fn exit_2(c: &mut Command) -> String {
    let o: Output = c.output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(2),
        "expected exit 2\n{}",
        describe(c, &o)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every command that reads the config, with a job name where it takes one (`None`:
/// the argument list has no job). `{job}` is replaced by the job name, `{out}` by a
/// fresh output directory.
const CONFIG_COMMANDS: &[&[&str]] = &[
    &["run", "{job}"],
    &["check-config"],
    &["status"],
    &["list", "{job}"],
    &["prune", "{job}"],
    &["prune", "--dry-run", "{job}"],
    &["verify", "{job}"],
    &["verify", "--deep", "{job}"],
    &["restore", "{job}", "f", "--to", "{out}"],
    &["cleanup", "{job}"],
];

fn args<'a>(cmd: &[&'a str], job: &'a str, out: &'a str) -> Vec<&'a str> {
    cmd.iter()
        .map(|a| match *a {
            "{job}" => job,
            "{out}" => out,
            a => a,
        })
        .collect()
}

#[test]
fn a_config_that_does_not_load_exits_2_naming_the_file_for_every_command() {
    let s = Setup::new();
    let file = s.config.display().to_string();
    let out = s.path("out").display().to_string();
    let valid = s.valid();
    let broken = [
        ("syntax error", valid.replace("[[job]]", "[[job]")),
        ("field error", valid.replace("dir:", "nfs:")),
        ("unknown field", format!("{valid}sorce = \"x\"\n")),
    ];
    for (what, text) in &broken {
        s.write_config(text);
        for cmd in CONFIG_COMMANDS {
            let a = args(cmd, "data", &out);
            let err = s.usage_error(&a);
            assert!(
                err.contains(&format!("{file}:")),
                "{what}: {a:?}: the message must name {file}:LINE: {err}"
            );
            assert!(!s.path("out").exists(), "{what}: {a:?}: wrote --to");
            assert!(
                !s.path("state").exists(),
                "{what}: {a:?}: touched state_dir"
            );
        }
    }
    // A config file that is not there at all.
    fs::remove_file(&s.config).unwrap();
    for cmd in CONFIG_COMMANDS {
        let a = args(cmd, "data", &out);
        let err = s.usage_error(&a);
        assert!(err.contains(&file), "missing file: {a:?}: {err}");
    }
}

#[test]
fn an_unknown_job_exits_2_naming_the_job_and_the_file() {
    let s = Setup::new();
    let file = s.config.display().to_string();
    let out = s.path("out").display().to_string();
    let mut checked = 0;
    for cmd in CONFIG_COMMANDS.iter().filter(|c| c.contains(&"{job}")) {
        let a = args(cmd, "nosuchjob", &out);
        let err = s.usage_error(&a);
        assert!(
            err.contains("\"nosuchjob\"") && err.contains(&file),
            "{a:?}: the message must name the job and {file}: {err}"
        );
        assert!(!s.path("out").exists(), "{a:?}: wrote --to");
        assert!(!s.path("target").exists(), "{a:?}: touched the target");
        checked += 1;
    }
    assert_eq!(checked, 8);
    // A known job before the unknown one is not started either.
    let err = s.usage_error(&["run", "data", "nosuchjob"]);
    assert!(err.contains("\"nosuchjob\""), "{err}");
    assert!(
        !s.path("target").exists(),
        "run data started before the check"
    );
    // The same config is fine: the code 2 above is about the name.
    let mut c = Command::new(bin());
    c.args(["check-config", "--config"]).arg(&s.config);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", describe(&c, &o));
}

#[test]
fn a_bad_as_of_exits_2_before_the_target_is_read() {
    let s = Setup::new();
    let out = s.path("out").display().to_string();
    for bad in ["yesterday", "2026-13-45", "20261124T01"] {
        let err = s.usage_error(&["restore", "data", "f", "--to", &out, "--as-of", bad]);
        assert!(
            err.contains("--as-of") && err.contains(bad),
            "{bad}: the message must name the option and the value: {err}"
        );
        assert!(!s.path("out").exists(), "{bad}: wrote --to");
    }
    // A `..` path is refused the same way.
    let err = s.usage_error(&["restore", "data", "a/../../etc", "--to", &out]);
    assert!(err.contains(".."), "{err}");
    assert!(!s.path("out").exists());
}

#[test]
fn bad_keep_options_exit_2_before_the_target_is_touched() {
    let s = Setup::new();
    let target = s.path("target");
    fs::create_dir_all(target.join("generations/20200101T000000Z")).unwrap();
    let prune = |extra: &[&str]| {
        let mut c = Command::new(bin());
        c.arg("prune").args(extra).arg("--target").arg(&target);
        exit_2(&mut c)
    };
    let err = prune(&["--keep-within", "2x"]);
    assert!(err.contains("2x"), "{err}");
    let err = prune(&["--keep-daily", "7", "--keep-within-weekly", "fortnight"]);
    assert!(err.contains("fortnight"), "{err}");
    let err = prune(&["--keep-last", "-5"]);
    assert!(err.contains("-5"), "{err}");
    let err = prune(&[]);
    assert!(err.contains("keeps nothing"), "{err}");
    assert!(
        target.join("generations/20200101T000000Z").is_dir(),
        "a refused policy touched the target"
    );
    // --keep-* with jobs instead of --target: clap's own usage error, also 2.
    s.usage_error(&["prune", "data", "--keep-last", "1"]);
    // A zfs:// target is pruned through its job, never taken for an ssh host "zfs".
    let err = exit_2(Command::new(bin()).args([
        "prune",
        "--keep-last",
        "1",
        "--target",
        "zfs://h/pool2/bk",
    ]));
    assert!(err.contains("snapveil prune JOB"), "{err}");
}

/// The EXIT STATUS section of the man page the binary generates (`snapveil gen-docs`,
/// what the package ships), up to the next section.
fn exit_status_section() -> String {
    let dir = tempfile::tempdir().unwrap();
    crate::util::ok(Command::new(bin()).arg("gen-docs").arg(dir.path()));
    let page = dir.path().join("man8/snapveil.8");
    let text = fs::read_to_string(&page).unwrap();
    let start = text
        .find(".SH EXIT STATUS")
        .unwrap_or_else(|| panic!("{}: no .SH EXIT STATUS", page.display()));
    let rest = &text[start + 1..];
    let end = rest.find("\n.SH ").map_or(rest.len(), |e| e + 1);
    rest[..end].to_string()
}

#[test]
fn the_man_page_documents_the_exit_codes() {
    let s = exit_status_section();
    for code in ["0", "1", "2"] {
        assert!(
            s.lines()
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| w[0] == ".TP" && w[1] == format!(".B {code}")),
            "EXIT STATUS must list {code} as a .TP entry:\n{s}"
        );
    }
    for word in ["config", "job", "keep", "as\\-of", "verify", "restore"] {
        assert!(s.contains(word), "EXIT STATUS must mention {word}:\n{s}");
    }
}
