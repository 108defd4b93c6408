//! One nightly run of a job, in order: lock → pre-snapshot hooks (held ones keep their
//! lock) → snapshot → release held hooks → post-snapshot hooks → mount the encrypted view
//! of the snapshot → rsync to `TARGET/current/` with `--backup-dir` generations → check
//! the snapshot stayed valid → record the restore point (`TARGET/runs/STAMP.json`) →
//! unmount → release the snapshot → post-backup or on-failure hooks → status.
//!
//! Every resource is held by a guard and released on every path out, in reverse order;
//! a signal only sets a flag (crate::signals), so cleanup is never cut in half. What a
//! crash leaves (a snapshot, a mount) is removed at the start of the next run of the job;
//! the lock and a FUSE mount go with the process anyway.

use crate::config::{Config, Job, Mode, Phase, Target};
use crate::crypto::KeyConfig;
use crate::exec::Runner;
use crate::hooks::{self, HeldHook, HookEnv};
use crate::lock::JobLock;
use crate::snapshot::{self, SnapshotGuard};
use crate::status::{self, RunStatus};
use crate::view::{self, MountedView, ViewOptions};
use anyhow::{bail, Context, Result};
use chrono::{SecondsFormat, Utc};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the job's view is mounted during a run.
pub fn view_mountpoint(state_dir: &Path, job: &str) -> PathBuf {
    state_dir.join("view").join(job)
}

/// Resources of a run, released in reverse order of acquisition.
#[derive(Default)]
struct Held<'a> {
    hooks: Vec<HeldHook>,
    snapshot: Option<SnapshotGuard<'a>>,
    view: Option<MountedView>,
}

impl Held<'_> {
    /// Releases everything still held; returns what failed (already logged).
    fn release(&mut self) -> Vec<String> {
        let mut errs = Vec::new();
        if let Some(v) = self.view.take() {
            if let Err(e) = v.unmount() {
                tracing::error!("{e}");
                errs.push(e.to_string());
            }
        }
        // Held hooks are released before or right after the snapshot; dropping them here
        // closes their stdin so they unlock.
        self.hooks.clear();
        if let Some(s) = self.snapshot.take() {
            if let Err(e) = s.release() {
                let m = snapshot::error_chain(&e);
                tracing::error!("{m}");
                errs.push(m);
            }
        }
        errs
    }
}

struct Success {
    bytes_sent: u64,
    files: u64,
    vanished: bool,
    consistent: bool,
}

/// Runs one job and returns its status (also saved under the state dir).
pub fn run_job(runner: &dyn Runner, cfg: &Config, job: &Job) -> RunStatus {
    let stamp = snapshot::now_stamp();
    let started = Utc::now();
    let t0 = Instant::now();
    let span = tracing::info_span!("job", job = %job.name, stamp = %stamp);
    let _e = span.enter();
    tracing::info!(source = %job.source, target = %job.target, "starting");
    let mut env = HookEnv::default();
    env.set("SNAPVEIL_JOB", &job.name);
    env.set("SNAPVEIL_SOURCE", job.source.to_string());
    env.set("SNAPVEIL_TARGET", job.target.to_string());
    env.set("SNAPVEIL_STAMP", &stamp);
    let lock = match JobLock::acquire(&cfg.state_dir, &job.name) {
        Ok(l) => l,
        Err(e) => {
            // Not our run to report: the status file belongs to the one holding the lock.
            tracing::error!("{e}");
            return RunStatus {
                job: job.name.clone(),
                stamp,
                result: "failure".into(),
                started: started.to_rfc3339_opts(SecondsFormat::Secs, true),
                finished: Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
                duration_s: 0.0,
                bytes_sent: 0,
                files_transferred: 0,
                consistent: false,
                generations: None,
                error: Some(e.to_string()),
            };
        }
    };
    let mut held = Held::default();
    let result = run_steps(runner, cfg, job, &stamp, &mut env, &mut held);
    let cleanup_errs = held.release();
    let result = match (result, cleanup_errs.is_empty()) {
        (Ok(s), true) => Ok(s),
        (Ok(_), false) => Err(anyhow::anyhow!(
            "cleanup failed: {}",
            cleanup_errs.join("; ")
        )),
        (Err(e), _) => Err(e),
    };
    // Prune only after a complete transfer, still under the job's lock. A failed prune
    // fails the job's status; current/ is never touched by it.
    let result = match result {
        Ok(s) if job.retention.prune => match crate::prune::prune_job(runner, cfg, job, false) {
            Ok(Some(report)) => {
                for line in report.to_string().lines() {
                    tracing::info!("{line}");
                }
                Ok(s)
            }
            Ok(None) => Ok(s),
            Err(e) => Err(e.context("the backup is complete, but pruning failed")),
        },
        r => r,
    };
    let (result_str, error, s) = match &result {
        Ok(s) => {
            env.set("SNAPVEIL_RESULT", "success");
            let hook = hooks::run_phase(runner, &job.hooks, Phase::PostBackup, &env);
            match hook {
                Ok(()) => (
                    if s.vanished { "warning" } else { "success" },
                    None,
                    Some(s),
                ),
                Err(e) => ("failure", Some(format!("backup done, but {e}")), Some(s)),
            }
        }
        Err(e) => {
            let msg = crate::error::chain(e.as_ref());
            tracing::error!("failed: {msg}");
            env.set("SNAPVEIL_RESULT", "failure");
            env.set("SNAPVEIL_ERROR", &msg);
            if let Err(he) = hooks::run_phase(runner, &job.hooks, Phase::OnFailure, &env) {
                tracing::error!("{he}");
            }
            ("failure", Some(msg), None)
        }
    };
    let generations = count_generations(runner, cfg, job);
    let st = RunStatus {
        job: job.name.clone(),
        stamp,
        result: result_str.into(),
        started: started.to_rfc3339_opts(SecondsFormat::Secs, true),
        finished: Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
        duration_s: (t0.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        bytes_sent: s.map(|s| s.bytes_sent).unwrap_or(0),
        files_transferred: s.map(|s| s.files).unwrap_or(0),
        consistent: s.map(|s| s.consistent).unwrap_or(false),
        generations,
        error,
    };
    if let Err(e) = status::save(&cfg.state_dir, &st) {
        tracing::error!(state_dir = %cfg.state_dir.display(), "cannot write status: {e}");
    }
    tracing::info!(result = %st.result, duration_s = st.duration_s, bytes_sent = st.bytes_sent, "finished");
    drop(lock);
    st
}

fn run_steps<'a>(
    runner: &'a dyn Runner,
    cfg: &Config,
    job: &Job,
    stamp: &str,
    env: &mut HookEnv,
    held: &mut Held<'a>,
) -> Result<Success> {
    if job.mode == Mode::ZfsRaw {
        bail!("mode zfs-raw is not available in this version of snapveil");
    }
    // Keys first: a wrong password must fail before anything is frozen.
    let key = KeyConfig::load(&job.key_config).context("loading the key config")?;
    let master = key
        .unlock_with_passfile(&job.passfile)
        .context("unlocking the key config")?;
    check_target(runner, cfg, job, &key)?;
    for what in cleanup_leftovers(runner, cfg, job)? {
        tracing::warn!("removed {what}, left by an earlier run");
    }
    let mp = view_mountpoint(&cfg.state_dir, &job.name);
    std::fs::create_dir_all(&mp).with_context(|| format!("creating {}", mp.display()))?;
    let work = snapshot::cmd::work_dir(&cfg.state_dir, &job.name);
    check_cancel()?;

    hooks::run_phase(runner, &job.hooks, Phase::PreSnapshot, env)?;
    held.hooks = hooks::start_held(runner, &job.hooks, env)?;
    check_cancel()?;
    let guard = snapshot::take(
        runner,
        &job.name,
        stamp,
        &job.source,
        &job.snapshot,
        &cfg.tools.snapshot,
        &work,
    )
    .map_err(|e| anyhow::anyhow!(snapshot::error_chain(&e)))
    .context("taking the snapshot")?;
    let consistent = guard.consistent();
    if !consistent {
        tracing::warn!(
            "source {} is read live, NOT from a snapshot: this backup may be inconsistent",
            job.source
        );
    }
    env.set("SNAPVEIL_SNAPSHOT_NAME", guard.name());
    env.set("SNAPVEIL_SNAPSHOT_PATH", guard.path().to_string_lossy());
    let snap_path = guard.path().to_path_buf();
    held.snapshot = Some(guard);
    for h in std::mem::take(&mut held.hooks) {
        h.finish()
            .context("the held pre-snapshot hook did not hold until the snapshot was taken")?;
    }
    hooks::run_phase(runner, &job.hooks, Phase::PostSnapshot, env)?;
    check_cancel()?;

    let v = MountedView::mount(
        &snap_path,
        &mp,
        ViewOptions {
            key,
            master,
            excludes: job.excludes.clone(),
        },
    )
    .context("mounting the encrypted view")?;
    held.view = Some(v);
    let cmd = crate::rsync::transfer_cmd(
        &cfg.tools,
        &job.target,
        &job.ssh_args,
        &job.rsync_args,
        &mp,
        stamp,
    );
    // The key config goes first: an interrupted transfer then leaves a current/ that
    // check_target still recognises as this job's, and the next run completes it.
    crate::rsync::upload(
        runner,
        &cfg.tools,
        &job.target,
        &job.ssh_args,
        &mp.join(crate::crypto::names::CONF_NAME),
        "current/",
    )
    .context("sending the key config (gocryptfs.conf) to the target")?;
    tracing::info!(cmd = %cmd, "transferring");
    let out = crate::rsync::transfer(runner, &cmd, &job.target).map_err(|e| {
        let e = anyhow::Error::from(e);
        // An overflowing LVM snapshot makes reads fail under rsync: name the cause.
        if let Some(Err(v)) = held.snapshot.as_ref().map(|s| s.verify()) {
            return anyhow::anyhow!(snapshot::error_chain(&v)).context(format!(
                "the transfer failed ({e}) because the snapshot became invalid"
            ));
        }
        if format!("{e}").contains("in --backup-dir") {
            // rrsync refuses `..`; an absolute path is anchored at its directory.
            e.context(format!(
                "the ssh key of {} is restricted by rrsync: write the target path as an \
                 absolute path below rrsync's directory (host:/PATH)",
                job.target
            ))
        } else {
            e
        }
    })?;
    check_cancel()?;
    if let Some(s) = held.snapshot.as_ref() {
        s.verify()
            .map_err(|e| anyhow::anyhow!(snapshot::error_chain(&e)))
            .context("the snapshot did not stay valid during the transfer")?;
    }
    let manifest = crate::verify::write_manifest(runner, cfg, job, stamp, &mp)
        .context("writing the manifest of the view")?;
    record_run(runner, cfg, job, stamp, &out)?;
    if job.verify_every > 0 {
        let runs = crate::verify::restore_points(runner, cfg, job)?.len() as u32;
        if runs % job.verify_every == 0 {
            let want = manifest.into_iter().map(|e| (e.path, e.sha1)).collect();
            let r = crate::verify::check_view_against_target(runner, cfg, job, &mp, &want)?;
            if !r.ok() {
                r.print();
                bail!("verify after the run: the target's current/ does not match the manifest");
            }
            tracing::info!(
                files = r.checked,
                "verified the target against the manifest"
            );
        }
    }
    let errs = held.release();
    if !errs.is_empty() {
        bail!("cleanup failed: {}", errs.join("; "));
    }
    Ok(Success {
        bytes_sent: out.stats.bytes_sent,
        files: out.stats.files_transferred,
        vanished: out.vanished,
        consistent,
    })
}

/// Refuses a target whose `current/` is not this job's backup: rsync `--delete` there
/// would destroy someone else's data. Ours carries `gocryptfs.conf`, the job's key config
/// byte for byte.
fn check_target(runner: &dyn Runner, cfg: &Config, job: &Job, key: &KeyConfig) -> Result<()> {
    let refuse = |what: &str| {
        anyhow::anyhow!("{}/current {what}; refusing to rsync --delete into it (wrong target, or another job's backup?)", job.target)
    };
    match &job.target {
        Target::Local(root) => {
            let cur = root.join("current");
            match std::fs::read(cur.join(crate::crypto::names::CONF_NAME)) {
                Ok(b) if b == key.raw => Ok(()),
                Ok(_) => Err(refuse("holds a gocryptfs.conf of another key config")),
                Err(_) => match std::fs::read_dir(&cur).map(|mut rd| rd.next().is_some()) {
                    Ok(true) => Err(refuse(
                        "exists but holds no gocryptfs.conf: it is not a snapveil backup",
                    )),
                    _ => Ok(()),
                },
            }
        }
        t => {
            let dir = cfg
                .state_dir
                .join("work")
                .join(&job.name)
                .join("target-check");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            let conf = dir.join(crate::crypto::names::CONF_NAME);
            let fetched = crate::rsync::base(&cfg.tools, t, &job.ssh_args)
                .arg(t.rsync_dest("current/gocryptfs.conf"))
                .arg(&conf)
                .run_checked(runner)
                .is_ok();
            let r = if fetched {
                if std::fs::read(&conf).ok().as_deref() == Some(&key.raw[..]) {
                    Ok(())
                } else {
                    Err(refuse("holds a gocryptfs.conf of another key config"))
                }
            } else if crate::rsync::list(runner, &cfg.tools, t, &job.ssh_args, "current")?
                .is_empty()
            {
                Ok(())
            } else {
                Err(refuse(
                    "exists but holds no gocryptfs.conf: it is not a snapveil backup",
                ))
            };
            let _ = std::fs::remove_dir_all(&dir);
            r
        }
    }
}

/// Removes what a crashed or killed run of `job` left behind: the view mount, the job's
/// own snapshots (clones, snapshot LVs and their mounts), the scratch dirs of dead
/// restores and verifies, and a local target's dead temp files, never anything else.
/// The caller holds the job's lock, so no running run's snapshot can be taken away.
///
/// # Errors
/// Unmounting or destroying failed; the error names what and why.
pub fn cleanup_leftovers(runner: &dyn Runner, cfg: &Config, job: &Job) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mp = view_mountpoint(&cfg.state_dir, &job.name);
    if view::cleanup_stale_mount(&mp)? {
        removed.push(format!("view mount {}", mp.display()));
    }
    let work = snapshot::cmd::work_dir(&cfg.state_dir, &job.name);
    let stale = snapshot::cleanup_stale(
        runner,
        &job.name,
        &job.source,
        &job.snapshot,
        &cfg.tools.snapshot,
        &work,
    )
    .map_err(|e| anyhow::anyhow!(snapshot::error_chain(&e)))
    .context("removing stale snapshots of earlier runs")?;
    removed.extend(stale.into_iter().map(|s| format!("snapshot {s}")));
    let scratch = crate::scratch::sweep(&work);
    removed.extend(scratch.iter().map(|p| format!("scratch {}", p.display())));
    if let Target::Local(root) = &job.target {
        for sub in ["manifests", "runs"] {
            let tmp = status::sweep_tmp_files(&root.join(sub));
            removed.extend(
                tmp.iter()
                    .map(|p| format!("temporary file {}", p.display())),
            );
        }
    }
    Ok(removed)
}

fn check_cancel() -> Result<()> {
    if crate::signals::cancelled() {
        let sig = crate::signals::last_signal()
            .and_then(|s| nix::sys::signal::Signal::try_from(s).ok())
            .map(|s| s.as_str())
            .unwrap_or("a signal");
        bail!("interrupted by {sig}");
    }
    Ok(())
}

/// Puts a small file at `TARGET/rel` (atomically on a local target).
fn put_file(runner: &dyn Runner, cfg: &Config, job: &Job, rel: &str, data: &[u8]) -> Result<()> {
    match &job.target {
        Target::Local(root) => {
            let p = root.join(rel);
            status::write_atomic(&p, data).with_context(|| format!("writing {}", p.display()))
        }
        _ => {
            let (dir_rel, name) = rel.rsplit_once('/').unwrap_or(("", rel));
            let dir = cfg.state_dir.join("work").join(&job.name).join("upload");
            std::fs::create_dir_all(&dir)?;
            let tmp = dir.join(name);
            std::fs::write(&tmp, data)?;
            let r = crate::rsync::upload(
                runner,
                &cfg.tools,
                &job.target,
                &job.ssh_args,
                &tmp,
                &format!("{dir_rel}/"),
            );
            let _ = std::fs::remove_file(&tmp);
            r.with_context(|| format!("uploading {rel} to {}", job.target))
        }
    }
}

/// Writes `TARGET/runs/STAMP.json`: the run is now a restore point.
fn record_run(
    runner: &dyn Runner,
    cfg: &Config,
    job: &Job,
    stamp: &str,
    out: &crate::rsync::Outcome,
) -> Result<()> {
    let rec = serde_json::json!({
        "stamp": stamp,
        "job": job.name,
        "finished": Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
        "bytes_sent": out.stats.bytes_sent,
        "files": out.stats.files_transferred,
    });
    let data = serde_json::to_vec_pretty(&rec).expect("json");
    put_file(runner, cfg, job, &format!("runs/{stamp}.json"), &data)
        .context("recording the run on the target")
}

/// Generation directories on the target, by name (only names that are snapveil stamps).
///
/// # Errors
/// Listing the target failed.
pub fn generations(runner: &dyn Runner, cfg: &Config, job: &Job) -> Result<Vec<String>> {
    let mut names: Vec<String> = match &job.target {
        Target::Local(root) => match std::fs::read_dir(root.join("generations")) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("listing {}", root.join("generations").display()))
            }
        },
        t => crate::rsync::list(runner, &cfg.tools, t, &job.ssh_args, "generations")?
            .into_iter()
            .filter(|l| l.is_dir)
            .map(|l| l.name)
            .collect(),
    };
    names.retain(|n| snapshot::valid_stamp(n));
    names.sort();
    Ok(names)
}

fn count_generations(runner: &dyn Runner, cfg: &Config, job: &Job) -> Option<u64> {
    match generations(runner, cfg, job) {
        Ok(g) => Some(g.len() as u64),
        Err(e) => {
            tracing::warn!(
                "cannot count generations: {}",
                crate::error::Chain(e.as_ref())
            );
            None
        }
    }
}
