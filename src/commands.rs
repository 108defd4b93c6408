//! The CLI edge of the view: `init`, `mount`, `umount`, `decrypt`. Turns arguments into
//! calls of `crypto`, `view` and `decrypt`, with `anyhow` context for the user.

use crate::cli::{DecryptArgs, InitArgs, MountArgs, OpenArgs, UmountArgs};
use crate::crypto::config::{self, dashed_hex, write_new_private};
use crate::crypto::names::CONF_NAME;
use crate::crypto::{KeyConfig, Keys, MasterKey, NameMode};
use crate::view::{self, ViewOptions};
use anyhow::{bail, Context, Result};
use base64::Engine;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;

pub fn init(a: InitArgs) -> Result<ExitCode> {
    if a.key.config.exists() {
        bail!(
            "{}: already exists; refusing to overwrite a key config",
            a.key.config.display()
        );
    }
    let password = if a.key.passfile.exists() {
        config::read_passfile(&a.key.passfile)?
    } else {
        // A random password: the view carries the scrypt-wrapped key to the target,
        // where a weak password could be brute-forced offline.
        use rand::RngCore;
        let mut raw = zeroize::Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut raw[..]);
        let mut line = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .encode(&raw[..])
                .into_bytes(),
        );
        line.push(b'\n');
        write_new_private(&a.key.passfile, &line)?;
        eprintln!(
            "snapveil: created passfile {} (32 random bytes, base64, mode 0600)",
            a.key.passfile.display()
        );
        line.pop();
        zeroize::Zeroizing::new(line.to_vec())
    };
    let names = if a.plaintext_names {
        NameMode::Plaintext
    } else if a.deterministic_names {
        NameMode::Deterministic
    } else {
        NameMode::DirIv
    };
    let master = MasterKey::random();
    let doc = config::new_config(&master, &password, names, a.scrypt_n);
    write_new_private(&a.key.config, &config::to_json(&doc))?;
    // Round-trip: what we wrote must load and unlock with the same password.
    let check = KeyConfig::load(&a.key.config)?.unlock(&password)?;
    if check.bytes() != master.bytes() {
        bail!(
            "{}: written config does not unlock to the generated key",
            a.key.config.display()
        );
    }
    let hexkey = dashed_hex(&master);
    let mut out = std::io::stdout().lock();
    writeln!(out, "Key config written to {}.", a.key.config.display())?;
    writeln!(out, "Your master key is:\n\n    {}\n", &*hexkey)?;
    writeln!(
        out,
        "If the key config is lost or the passfile forgotten, this key is the only way back to\n\
         your data (gocryptfs -masterkey=... -aessiv). Print it, keep it in a drawer. It is not shown again."
    )?;
    Ok(ExitCode::SUCCESS)
}

fn view_options(a: &MountArgs) -> Result<ViewOptions> {
    let key = KeyConfig::load(&a.key.config)?;
    let master = key.unlock_with_passfile(&a.key.passfile)?;
    Ok(ViewOptions {
        key,
        master,
        excludes: a.exclude.clone(),
    })
}

/// Env var marking the detached child of `mount --background`.
const DAEMON_ENV: &str = "SNAPVEIL_MOUNT_DAEMON";

pub fn mount(a: MountArgs) -> Result<ExitCode> {
    if a.background {
        return mount_background(&a);
    }
    let ready = daemon_ready();
    // Fail fast on every checkable input before anything is mounted.
    view::mount::check_paths(&a.source, &a.mountpoint)?;
    let opts = view_options(&a)?;
    view::mount::run_foreground(&a.source, &a.mountpoint, opts, ready)
        .with_context(|| format!("serving {}", a.mountpoint.display()))?;
    Ok(ExitCode::SUCCESS)
}

fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors; `null` stays open until after.
            unsafe {
                libc::dup2(null.as_raw_fd(), fd);
            }
        }
    }
}

fn mount_background(a: &MountArgs) -> Result<ExitCode> {
    view::mount::check_paths(&a.source, &a.mountpoint)?;
    // Unlock here too so a wrong password is reported by this process, not lost.
    drop(view_options(a)?);
    let mut args: Vec<OsString> = vec![
        "mount".into(),
        "--config".into(),
        a.key.config.clone().into(),
    ];
    args.extend(["--passfile".into(), a.key.passfile.clone().into()]);
    for e in &a.exclude {
        args.extend(["--exclude".into(), e.into()]);
    }
    args.extend([a.source.clone().into(), a.mountpoint.clone().into()]);
    spawn_daemon(&args, &a.mountpoint)
}

/// Runs ourselves in the foreground as a detached child and returns once it reports
/// that the mount answers; its errors reach our stderr before that.
fn spawn_daemon(args: &[OsString], mountpoint: &Path) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("locating the snapveil binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args)
        .env(DAEMON_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().context("starting the mount daemon")?;
    let out = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line).ok();
    if line.trim() == "ready" {
        println!("{}: mounted (pid {})", mountpoint.display(), child.id());
        return Ok(ExitCode::SUCCESS);
    }
    let status = child.wait()?;
    bail!(
        "{}: mount daemon exited before the mount answered ({status})",
        mountpoint.display()
    )
}

/// In the daemon child: leave the caller's session, and once the mount answers, tell
/// the parent and let go of its terminal.
fn daemon_ready() -> impl FnOnce() + Send + 'static {
    let daemon = std::env::var_os(DAEMON_ENV).is_some();
    if daemon {
        let _ = nix::unistd::setsid();
    }
    move || {
        if daemon {
            println!("ready");
            let _ = std::io::stdout().flush();
            detach_stdio();
        }
    }
}

pub fn umount(a: UmountArgs) -> Result<ExitCode> {
    view::mount::unmount_path(&a.mountpoint)?;
    Ok(ExitCode::SUCCESS)
}

/// Keys for reading a backup copy: its own `gocryptfs.conf` unless `--config` is given.
/// A generation directory carries no config of its own; for `TARGET/generations/STAMP`
/// the target's `current/gocryptfs.conf` (same key: check_target guarantees it) is used.
fn copy_keys(config: Option<&Path>, tree: &Path, passfile: &Path) -> Result<Keys> {
    let conf_path = config.map(Path::to_path_buf).unwrap_or_else(|| {
        let own = tree.join(CONF_NAME);
        let generation = tree
            .parent()
            .filter(|p| p.file_name().is_some_and(|n| n == "generations"))
            .and_then(Path::parent)
            .map(|t| t.join("current").join(CONF_NAME));
        match generation {
            Some(g) if !own.exists() && g.exists() => {
                tracing::info!(config = %g.display(), "a generation: using the target's key config");
                g
            }
            _ => own,
        }
    });
    // A config inside a backup copy is not secret on its own (scrypt-wrapped) and rsync
    // may have stored it with any mode; an explicit --config must be private.
    let key = if config.is_some() {
        KeyConfig::load(&conf_path)?
    } else {
        KeyConfig::load_public(&conf_path)?
    };
    let master = key.unlock_with_passfile(passfile)?;
    Ok(Keys::new(&master, key.flags))
}

pub fn open(a: OpenArgs) -> Result<ExitCode> {
    let keys = copy_keys(a.config.as_deref(), &a.target_dir, &a.passfile)?;
    view::mount::check_paths(&a.target_dir, &a.mountpoint)?;
    if a.background {
        drop(keys);
        let mut args: Vec<OsString> = vec![
            "open".into(),
            "--passfile".into(),
            a.passfile.clone().into(),
        ];
        if let Some(c) = &a.config {
            args.extend(["--config".into(), c.clone().into()]);
        }
        args.extend([a.target_dir.clone().into(), a.mountpoint.clone().into()]);
        return spawn_daemon(&args, &a.mountpoint);
    }
    let ready = daemon_ready();
    let core = Arc::new(view::forward::ForwardCore::new(&a.target_dir, keys)?);
    tracing::info!(copy = %a.target_dir.display(), mountpoint = %a.mountpoint.display(), "serving decrypted view of a backup copy");
    view::mount::serve(core, &a.mountpoint, ready)?;
    Ok(ExitCode::SUCCESS)
}

pub fn decrypt(a: DecryptArgs) -> Result<ExitCode> {
    let keys = copy_keys(a.config.as_deref(), &a.encrypted_tree, &a.passfile)?;
    let r = crate::decrypt::decrypt_tree(&keys, &a.encrypted_tree, &a.out_dir)?;
    eprintln!(
        "snapveil: decrypted {} files ({} bytes), {} directories, {} symlinks, {} other into {}",
        r.files,
        r.bytes,
        r.dirs,
        r.symlinks,
        r.others,
        a.out_dir.display()
    );
    if r.failures.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "snapveil: {} entries could NOT be restored:",
            r.failures.len()
        );
        for (p, why) in &r.failures {
            eprintln!("  {}: {why}", p.display());
        }
        Ok(ExitCode::from(crate::error::EXIT_FAILURE))
    }
}

/// Loads the job config; on errors prints every problem and exits 2.
fn load_config(
    a: &crate::cli::ConfigArg,
) -> Result<std::result::Result<crate::config::Config, ExitCode>> {
    match crate::config::load(&a.config) {
        Ok(c) => {
            for w in &c.warnings {
                tracing::warn!("{w}");
            }
            Ok(Ok(c))
        }
        Err(e) => {
            eprintln!("snapveil: invalid config:\n{e}");
            Ok(Err(ExitCode::from(crate::error::EXIT_USAGE)))
        }
    }
}

pub fn check_config(a: crate::cli::ConfigArg) -> Result<ExitCode> {
    let cfg = match load_config(&a)? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    println!(
        "{}: OK, {} job(s): {}",
        a.config.display(),
        cfg.jobs.len(),
        cfg.jobs
            .iter()
            .map(|j| j.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(ExitCode::SUCCESS)
}

pub fn run_jobs(runner: &dyn crate::exec::Runner, a: crate::cli::RunArgs) -> Result<ExitCode> {
    let cfg = match load_config(&a.config)? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    crate::signals::install().context("installing signal handlers")?;
    let jobs = match cfg.select(&a.jobs) {
        Ok(j) => j,
        Err(n) => {
            eprintln!(
                "snapveil: no job named {n:?} in {}",
                a.config.config.display()
            );
            return Ok(ExitCode::from(crate::error::EXIT_USAGE));
        }
    };
    let mut failed = Vec::new();
    for job in jobs {
        if crate::signals::cancelled() {
            failed.push(format!("{} (not started: interrupted)", job.name));
            continue;
        }
        let st = crate::job::run_job(runner, &cfg, job);
        if st.result == "failure" {
            failed.push(job.name.clone());
        }
        println!(
            "{}: {} in {:.1} s, {} bytes sent{}",
            st.job,
            st.result,
            st.duration_s,
            st.bytes_sent,
            st.error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
    }
    let names: Vec<String> = cfg.jobs.iter().map(|j| j.name.clone()).collect();
    if let Err(e) = crate::status::write_prometheus(&cfg.state_dir, &names) {
        tracing::warn!(
            "cannot write {}: {e}",
            cfg.state_dir.join("snapveil.prom").display()
        );
    }
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("snapveil: failed: {}", failed.join(", "));
        Ok(ExitCode::from(crate::error::EXIT_FAILURE))
    }
}

/// `snapveil cleanup [JOB]...`: removes what crashed runs left (view mounts, snapshots)
/// for every configured job, each under its lock so a running job is never touched.
pub fn cleanup_jobs(
    runner: &dyn crate::exec::Runner,
    a: &crate::cli::CleanupArgs,
) -> Result<ExitCode> {
    let cfg = match load_config(&a.config)? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let jobs = match cfg.select(&a.jobs) {
        Ok(j) => j,
        Err(n) => {
            eprintln!(
                "snapveil: no job named {n:?} in {}",
                a.config.config.display()
            );
            return Ok(ExitCode::from(crate::error::EXIT_USAGE));
        }
    };
    let mut failed = false;
    for job in jobs {
        let _lock = match crate::lock::JobLock::acquire(&cfg.state_dir, &job.name) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("snapveil: {e}: skipped");
                failed = true;
                continue;
            }
        };
        match crate::job::cleanup_leftovers(runner, &cfg, job) {
            Ok(removed) if removed.is_empty() => println!("{}: nothing left behind", job.name),
            Ok(removed) => {
                for r in removed {
                    println!("{}: removed {r}", job.name);
                }
            }
            Err(e) => {
                eprintln!(
                    "snapveil: {}: {}",
                    job.name,
                    crate::error::Chain(e.as_ref())
                );
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::from(crate::error::EXIT_FAILURE)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn status(a: crate::cli::ConfigArg) -> Result<ExitCode> {
    let cfg = match load_config(&a)? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    println!(
        "{:<16} {:<21} {:<8} {:>9} {:>14} {:>11}  NOTE",
        "JOB", "LAST RUN (UTC)", "RESULT", "DURATION", "BYTES SENT", "GENERATIONS"
    );
    for j in &cfg.jobs {
        match crate::status::load(&cfg.state_dir, &j.name) {
            Some(s) => println!(
                "{:<16} {:<21} {:<8} {:>8.1}s {:>14} {:>11}  {}{}",
                s.job,
                s.finished,
                s.result,
                s.duration_s,
                s.bytes_sent,
                s.generations
                    .map(|g| g.to_string())
                    .unwrap_or_else(|| "?".into()),
                if s.consistent || s.result == "failure" {
                    ""
                } else {
                    "NOT a snapshot (live tree) "
                },
                s.error.unwrap_or_default()
            ),
            None => println!("{:<16} {:<21}", j.name, "never"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn list(runner: &dyn crate::exec::Runner, a: crate::cli::ListArgs) -> Result<ExitCode> {
    let cfg = match load_config(&a.config)? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let Some(job) = cfg.job(&a.job) else {
        eprintln!("snapveil: no job named {:?}", a.job);
        return Ok(ExitCode::from(crate::error::EXIT_USAGE));
    };
    let gens = crate::job::generations(runner, &cfg, job)?;
    let runs: std::collections::BTreeSet<String> = match &job.target {
        crate::config::Target::Local(root) => std::fs::read_dir(root.join("runs"))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default(),
        t => crate::rsync::list(runner, &cfg.tools, t, &job.ssh_args, "runs")?
            .into_iter()
            .map(|l| l.name)
            .collect(),
    };
    let points: Vec<String> = runs
        .iter()
        .filter_map(|r| r.strip_suffix(".json"))
        .map(String::from)
        .collect();
    println!("target {}", job.target);
    println!("{:<18} {:<13} GENERATION DIR", "STAMP", "RESTORE POINT");
    let mut all: std::collections::BTreeSet<String> = gens.iter().cloned().collect();
    all.extend(points.iter().cloned());
    for s in all.iter().rev() {
        println!(
            "{:<18} {:<13} {}",
            s,
            if points.contains(s) {
                "yes"
            } else {
                "no (failed)"
            },
            if gens.contains(s) {
                format!("generations/{s}/")
            } else {
                "-".into()
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
