//! One nightly run of a job, in order: lock → unlock the key → read the target (layout,
//! restore points: [`crate::target::Target::scan`]) and check it is this job's → pick a
//! stamp newer than everything on it → pre-snapshot hooks (held ones keep their lock) →
//! snapshot → release held hooks → post-snapshot hooks → mount the encrypted view of the
//! snapshot → rsync to `TARGET/current/` with `--backup-dir` generations, then a checksum
//! pass over files whose ctime says they changed but rsync's quick check did not send →
//! check the snapshot stayed valid → manifests, then the record (`TARGET/runs/STAMP.json`:
//! now a restore point) → unmount → release the snapshot → prune → post-backup or
//! on-failure hooks → status. The snapshot → view half is shared with `verify`
//! ([`take_snapshot`], [`mount_view`]).
//!
//! Every resource is held by a guard and released on every path out, in reverse order;
//! a signal only sets a flag (crate::signals), so cleanup is never cut in half. What a
//! crash leaves (a snapshot, a mount) is removed at the start of the next run of the job;
//! the lock and a FUSE mount go with the process anyway.

use crate::changes;
use crate::config::{Config, Job, Mode, Phase};
use crate::crypto::KeyConfig;
use crate::exec::Runner;
use crate::hooks::{self, HeldHook, HookEnv};
use crate::lock::JobLock;
use crate::snapshot::{self, SnapshotGuard};
use crate::status::{self, RunResult, RunStatus};
use crate::target::{Area, Pass, Target};
use crate::view::{self, MountedView, ViewOptions};
use anyhow::{bail, Context, Result};
use chrono::{SecondsFormat, Utc};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where the job's view is mounted during a run.
pub fn view_mountpoint(state_dir: &Path, job: &str) -> PathBuf {
    state_dir.join("view").join(job)
}

/// Resources of a run (a push or a pull, crate::pull), released in reverse order of
/// acquisition.
#[derive(Default)]
pub(crate) struct Held<'a> {
    pub(crate) hooks: Vec<HeldHook>,
    pub(crate) snapshot: Option<SnapshotGuard<'a>>,
    pub(crate) view: Option<MountedView>,
}

impl Held<'_> {
    /// Releases everything still held; returns what failed (already logged).
    pub(crate) fn release(&mut self) -> Vec<String> {
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

/// What `snapveil run` was told to accept about a target's records (issue 14).
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// `--accept-rollback`: the target's newest restore point is older than what this
    /// machine last wrote there.
    pub accept_rollback: bool,
    /// `--accept-truncation`: records missing (not by prune), replaced, or tampered.
    pub accept_truncation: bool,
    /// `--full`: rsync the whole view ([`crate::changes`]).
    pub full: bool,
}

/// Runs one job and returns its status (also saved under the state dir).
pub fn run_job(runner: &dyn Runner, cfg: &Config, job: &Job, opts: RunOptions) -> RunStatus {
    // Until the target is read, the stamp is provisional (see crate::target::new_stamp).
    let mut stamp = snapshot::now_stamp();
    let started = Utc::now();
    let t0 = Instant::now();
    let span = tracing::info_span!("job", job = %job.name, stamp = tracing::field::Empty);
    let _e = span.enter();
    tracing::info!(source = %job.source, target = %job.target, "starting");
    let mut env = HookEnv::default();
    env.set("SNAPVEIL_JOB", &job.name);
    env.set("SNAPVEIL_SOURCE", job.source.to_string());
    env.set("SNAPVEIL_TARGET", job.target.to_string());
    let lock = match JobLock::acquire(&cfg.state_dir, &job.name) {
        Ok(l) => l,
        Err(e) => {
            // Not our run to report: the status file belongs to the one holding the lock.
            tracing::error!("{e}");
            return RunStatus {
                job: job.name.clone(),
                stamp,
                result: RunResult::Failure,
                started: started.to_rfc3339_opts(SecondsFormat::Secs, true),
                finished: Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
                duration_s: 0.0,
                bytes_sent: 0,
                files_transferred: 0,
                consistent: false,
                generations: None,
                error: Some(e.to_string()),
                raw: None,
            };
        }
    };
    let mut held = Held::default();
    let target = Target::for_job(cfg, job);
    let result = run_steps(
        runner, cfg, job, opts, &target, &mut stamp, &mut env, &mut held,
    );
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
        // A zfs:// target's snapshots were pruned by the run itself (raw_steps).
        Ok(s) if job.retention.prune && target.address().zfs().is_none() => {
            let pruned = if job.mode == Mode::ZfsRaw {
                crate::zfs_send::chains::prune_job(runner, &target, job, false, Some(&stamp))
                    .map(|r| r.map(|r| r.to_string()))
                    .map_err(|e| anyhow::anyhow!(crate::error::Chain(&e).to_string()))
            } else {
                crate::prune::prune_job(runner, &target, job, false, Some(&stamp))
                    .map(|r| r.map(|r| r.to_string()))
            };
            match pruned {
                Ok(Some(report)) => {
                    for line in report.lines() {
                        tracing::info!("{line}");
                    }
                    Ok(s)
                }
                Ok(None) => Ok(s),
                Err(e) => Err(e.context("the backup is complete, but pruning failed")),
            }
        }
        r => r,
    };
    let (result_str, error, s) = match &result {
        Ok(s) => {
            env.set("SNAPVEIL_RESULT", "success");
            let hook = hooks::run_phase(runner, &job.hooks, Phase::PostBackup, &env);
            match hook {
                Ok(()) => (
                    if s.vanished {
                        RunResult::Warning
                    } else {
                        RunResult::Success
                    },
                    None,
                    Some(s),
                ),
                Err(e) => (
                    RunResult::Failure,
                    Some(format!("backup done, but {e}")),
                    Some(s),
                ),
            }
        }
        Err(e) => (
            RunResult::Failure,
            Some(on_failure(runner, job, &mut env, e)),
            None,
        ),
    };
    let raw = (job.mode == Mode::ZfsRaw && target.address().zfs().is_none())
        .then(|| crate::zfs_send::raw_status(runner, &target, &job.name))
        .flatten();
    let generations = match target.address().zfs() {
        // This job's snapshots on a zfs:// target.
        Some(z) => match crate::zfs_send::receive::Receiver::for_job(runner, cfg, job, z)
            .job_snapshots(&job.name)
        {
            Ok(v) => Some(v.len() as u64),
            Err(e) => {
                tracing::warn!("cannot count the snapshots on {z}: {e}");
                None
            }
        },
        None if job.mode == Mode::ZfsRaw => None,
        None => match target.generations(runner) {
            Ok(g) => Some(g.len() as u64),
            Err(e) => {
                tracing::warn!("cannot count generations: {e}");
                None
            }
        },
    };
    let st = RunStatus {
        job: job.name.clone(),
        stamp,
        result: result_str,
        started: started.to_rfc3339_opts(SecondsFormat::Secs, true),
        finished: Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true),
        duration_s: (t0.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        bytes_sent: s.map(|s| s.bytes_sent).unwrap_or(0),
        files_transferred: s.map(|s| s.files).unwrap_or(0),
        consistent: s.map(|s| s.consistent).unwrap_or(false),
        generations,
        error,
        raw,
    };
    if let Err(e) = status::save(&cfg.state_dir, &st) {
        tracing::error!(state_dir = %cfg.state_dir.display(), "cannot write status: {e}");
    }
    tracing::info!(result = %st.result, duration_s = st.duration_s, bytes_sent = st.bytes_sent, "finished");
    drop(lock);
    st
}

#[allow(clippy::result_large_err)] // the snapshot provider's error, checked in a closure
#[allow(clippy::too_many_arguments)]
fn run_steps<'a>(
    runner: &'a dyn Runner,
    cfg: &Config,
    job: &Job,
    opts: RunOptions,
    target: &Target,
    stamp_out: &mut String,
    env: &mut HookEnv,
    held: &mut Held<'a>,
) -> Result<Success> {
    if job.mode == Mode::ZfsRaw {
        return raw_steps(runner, cfg, job, opts, target, stamp_out, env, held);
    }
    // Keys first: a wrong password must fail before anything is frozen.
    let key = KeyConfig::load(&job.key_config).context("loading the key config")?;
    let master = key
        .unlock_with_passfile(&job.passfile)
        .context("unlocking the key config")?;
    target.set_auth(crate::crypto::RecordKey::new(&master));
    // What the target holds decides the stamp, and its layout whether we may write.
    let contents = target.scan(runner).context("reading the target")?;
    // An empty current/ (a first run) holds nothing but what this run sends.
    let empty = target.check_owner(runner, &key.raw)?;
    // Its records must be ours and complete before anything is sent with --delete.
    let link = check_chain(
        cfg,
        job,
        opts,
        target,
        |st| contents.chain(st),
        contents.unsealed().len(),
    )?;
    let stamp = crate::target::new_stamp(&target.address().to_string(), &contents)?;
    let stamp = stamp.as_str();
    tracing::Span::current().record("stamp", stamp);
    *stamp_out = stamp.to_string();
    env.set("SNAPVEIL_STAMP", stamp);
    for what in cleanup_leftovers(runner, cfg, job)? {
        tracing::warn!("removed {what}, left by an earlier run");
    }
    let mp = view_mountpoint(&cfg.state_dir, &job.name);
    std::fs::create_dir_all(&mp).with_context(|| format!("creating {}", mp.display()))?;
    // The last restore point's manifest, read now, before the view and its walk take
    // their memory: the file itself is only needed while it is parsed (issue 13).
    let prev = contents.points.last().and_then(|p| {
        match crate::verify::prev_manifest(runner, target, &contents, p) {
            Ok(prev) => Some(prev),
            Err(e) => {
                tracing::warn!(
                    "the last restore point's manifest cannot be used ({}): hashing every file",
                    crate::error::Chain(&e)
                );
                None
            }
        }
    });
    check_cancel()?;

    let snap_path = freeze(runner, cfg, job, stamp, env, held)?;
    let consistent = held.snapshot.as_ref().is_some_and(|s| s.consistent());
    check_cancel()?;

    let v = mount_view(job, &snap_path, consistent, &mp, key, master)
        .context("mounting the encrypted view")?;
    held.view = Some(v);
    // The key config goes first: an interrupted transfer then leaves a current/ that
    // check_owner still recognises as this job's, and the next run completes it. It is
    // sent while the view is walked (an ssh target's connection costs its own round
    // trips), and before anything else is.
    let send_conf = || {
        target
            .send_file(
                runner,
                Area::Current,
                &mp.join(crate::crypto::names::CONF_NAME),
            )
            .context("sending the key config (gocryptfs.conf) to the target")
    };
    // An overflowing LVM snapshot makes reads fail under rsync, or under this process
    // writing current/ itself: name the cause.
    let explain = |e: anyhow::Error| match held.snapshot.as_ref().map(|s| s.verify()) {
        Some(Err(v)) => anyhow::anyhow!(snapshot::error_chain(&v)).context(format!(
            "the transfer failed ({e:#}) because the snapshot became invalid"
        )),
        _ => e,
    };
    let transfer = |pass: Pass<'_>| {
        target
            .send_view(runner, &mp, stamp, &job.rsync_args, pass)
            .map_err(|e| explain(e.into()))
    };
    // The whole view, learnt in process (not through the mount): it decides what the
    // transfer covers, then serves the checksum pass and the manifest. The view shows a
    // frozen snapshot, so nothing changes in between. The walk goes to the run's
    // scratch, and the `.meta` file is written as it goes (issue 13: neither is held in
    // memory); the `.meta` is sent with the `.sha1`, made there too, at the end.
    let scratch = target.staged("meta", "view.meta")?;
    let walk_file = scratch.path.with_file_name("view.walk");
    let sha1_file = scratch.path.with_file_name("view.sha1");
    let mut meta = std::fs::File::create(&scratch.path)
        .map(|f| std::io::BufWriter::with_capacity(1 << 16, f))
        .with_context(|| format!("writing {}", scratch.path.display()))?;
    let phase = Instant::now();
    let core = held.view.as_ref().expect("mounted above").core();
    let walk_and_send = |meta: &mut dyn std::io::Write,
                         also: Option<&mut crate::verify::AlsoVisit<'_>>|
     -> Result<(crate::verify::ViewWalk, std::time::Duration)> {
        let (sent, walk) = std::thread::scope(|s| {
            let span = tracing::Span::current();
            let sending = s.spawn(move || span.in_scope(send_conf));
            let walk = crate::verify::walk_core(core, &mp, &walk_file, meta, also)
                .context("walking the view");
            let walked = phase.elapsed();
            let sent = sending
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
            (sent, walk.map(|w| (w, walked)))
        });
        sent?;
        walk
    };
    // A first run into an empty current/ on this machine is written as the view is
    // walked, with the manifest's sums, instead of by rsync through the mount
    // (crate::target::seed): only from a frozen snapshot, and only without rsync_args of
    // the user's, whose effect on a copy rsync did not make would be a guess.
    let seed_into = (empty && consistent && job.rsync_args.is_empty())
        .then(|| target.current_here())
        .flatten();
    let ((walk, walked), seeded) = match &seed_into {
        Some(current) => {
            let (w, s) = crate::target::seed::run(core, current, &sha1_file, |feed| {
                walk_and_send(
                    &mut meta,
                    Some(&mut |p, a, l, r| feed.entry(p, a, l, r).map_err(Into::into)),
                )
            })?;
            (w, Some(s))
        }
        None => (walk_and_send(&mut meta, None)?, None),
    };
    drop(meta);
    tracing::info!(
        entries = walk.len(),
        secs = walked.as_secs_f32(),
        "walked the view"
    );
    let address = target.address().to_string();
    let view_config = changes::view_config(&job.source.to_string(), &job.excludes, &job.rsync_args);
    let index_path = changes::index_path(&cfg.state_dir, &job.name);
    let now = Utc::now().timestamp();
    let plan = changes::plan(
        changes::Index::load(&index_path),
        &walk,
        &changes::Expect {
            target: &address,
            newest: contents.points.last().map(String::as_str),
            config: &view_config,
            frozen: consistent,
            forced_full: opts.full,
            empty,
            full_every: job.full_every.as_secs() as i64,
            now,
        },
    )
    .context("planning the transfer")?;
    // This run's index is written from the walk while the transfer runs and the
    // manifest is hashed, and put in place once the run is recorded.
    let head = changes::Head {
        target: address.to_string(),
        stamp: stamp.to_string(),
        config: view_config,
        full_at: match &plan {
            changes::Plan::Full(_) => now,
            changes::Plan::Changes { full_at, .. } => *full_at,
        },
    };
    let save_index = || {
        changes::Index::save_pending(&walk, &head, &index_path)
            .map_err(|e| tracing::warn!("{e}: the next run will do a full pass"))
            .ok()
    };
    check_cancel()?;
    let phase = Instant::now();
    // The sums of what this process wrote into current/ itself, by path: the manifest
    // takes them instead of reading those files again.
    let known = std::sync::Mutex::new(crate::target::update::Sums::new());
    let work = snapshot::cmd::work_dir(&cfg.state_dir, &job.name);
    let send = || -> Result<crate::target::rsync::Outcome> {
        Ok(match &plan {
            changes::Plan::Full(why) => {
                tracing::info!("full pass over the view: {why}");
                match seeded {
                    Some(s) => {
                        tracing::info!(
                            files = s.files,
                            bytes = s.bytes,
                            entries = s.entries,
                            "wrote current/ as the view was walked: nothing to transfer"
                        );
                        crate::target::rsync::Outcome {
                            stats: crate::target::rsync::Stats {
                                files_transferred: s.files,
                                bytes_sent: s.bytes,
                                total_size: s.bytes,
                            },
                            items: s.entries as usize,
                            ..Default::default()
                        }
                    }
                    None => transfer(if empty { Pass::First } else { Pass::Full })?,
                }
            }
            // An empty current/ is always a full pass (changes::Expect::empty).
            changes::Plan::Changes { .. } if seeded.is_some() => {
                bail!("internal: a seeded current/ planned as changes only")
            }
            changes::Plan::Changes { list, .. } if list.is_empty() => {
                tracing::info!("nothing changed since the last run: no transfer");
                crate::target::rsync::Outcome::default()
            }
            changes::Plan::Changes { list, .. } => {
                tracing::info!(
                    entries = list.len(),
                    "sending what changed since the last run"
                );
                // Files rewritten in place and nothing else, into current/ on this
                // machine: written by this process, on the same terms as the seed.
                let here = (consistent && job.rsync_args.is_empty())
                    .then(|| target.current_here().zip(target.generation_here(stamp)))
                    .flatten();
                if let Some((current, generation)) = here {
                    if let Some((out, sums)) =
                        rewrite_here(core, &current, &generation, list, &work).map_err(explain)?
                    {
                        *known.lock().unwrap_or_else(|p| p.into_inner()) = sums;
                        return Ok(out);
                    }
                }
                let l = target.files_from(list)?;
                // rsync's sender looks these up one at a time, a round trip each:
                // threads ask for them ahead of it.
                let stop = std::sync::atomic::AtomicBool::new(false);
                let (warmed, sent) = std::thread::scope(|s| {
                    let warming = s.spawn(|| crate::view::warm::warm(&mp, list, &stop));
                    let sent = transfer(Pass::Changes { list: l.path() });
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    let warmed = warming
                        .join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p));
                    (warmed, sent)
                });
                tracing::info!(
                    paths = warmed.paths,
                    files_read = warmed.files_read,
                    bytes_read = warmed.bytes_read,
                    secs = warmed.secs,
                    "looked up ahead of rsync"
                );
                sent?
            }
        })
    };
    // Joined after the manifest is hashed, not after the transfer: a night with nothing
    // to send would wait for it.
    let (index, done) = std::thread::scope(|s| {
        let span = tracing::Span::current();
        let saving = s.spawn(move || span.in_scope(save_index));
        let done = (|| -> Result<crate::target::rsync::Outcome> {
            let mut out = send()?;
            tracing::info!(
                files = out.items,
                secs = phase.elapsed().as_secs_f32(),
                "transfer done"
            );
            check_cancel()?;
            // rsync's quick check (size, whole-second mtime) misses a file rewritten with
            // the same size in the second it was last backed up, or whose mtime was set
            // back. Such a file changed since the last restore point, so its ctime says so:
            // those rsync did not just send go through once more, compared by checksum.
            let since = contents
                .points
                .last()
                .and_then(|p| crate::stamp::Stamp::parse(p))
                .map(|p| p.time().timestamp());
            // Into an empty current/ everything was sent (the key config just before,
            // from this same view): nothing there can differ unseen.
            let changed = if empty {
                Vec::new()
            } else {
                changed_since(&walk, since, &out.sent)?
            };
            if prev.is_none() {
                // The manifest hashes every file: the names rsync sent (one per file on a
                // first run) would only add to the run's peak memory while it does.
                out.sent = crate::manifest::PathSet::new();
            }
            let mut resent = crate::manifest::PathSet::new();
            if !changed.is_empty() {
                tracing::info!(
                    files = changed.len(),
                    "comparing files changed since the last restore point by checksum"
                );
                let list = target.files_from(&changed)?;
                let second = transfer(Pass::Checksum { list: list.path() })?;
                if !second.sent.is_empty() {
                    tracing::info!(
                        files = second.items,
                        "sent files whose size and mtime had not changed"
                    );
                }
                resent = second.sent;
                out.stats.bytes_sent += second.stats.bytes_sent;
                out.stats.files_transferred += second.stats.files_transferred;
                out.vanished |= second.vanished;
                check_cancel()?;
            }
            if let Some(s) = held.snapshot.as_ref() {
                s.verify()
                    .map_err(|e| anyhow::anyhow!(snapshot::error_chain(&e)))
                    .context("the snapshot did not stay valid during the transfer")?;
            }
            // What the manifest must hash again: everything rsync sent and everything
            // changed since the last restore point; the rest of current/ is that point's
            // ciphertext.
            let reuse = prev.map(|prev| {
                let mut rehash = std::mem::take(&mut out.sent);
                for p in &changed {
                    rehash.insert(p);
                }
                rehash.merge(resent);
                rehash.seal();
                crate::verify::Reuse {
                    prev,
                    rehash,
                    known: std::mem::take(&mut *known.lock().unwrap_or_else(|p| p.into_inner())),
                }
            });
            match seeded {
                None => crate::verify::hash_view(&walk, reuse.as_ref(), &sha1_file)
                    .context("hashing the view")?,
                Some(s) => tracing::info!(
                    files = s.files,
                    hashed = s.files,
                    "manifest of the view, summed as current/ was written"
                ),
            }
            Ok(out)
        })();
        let index = saving
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (index, done)
    });
    drop(plan);
    let out = done?;
    // Nothing reads the view or the snapshot any more, unless this run may verify the
    // target through the view: they are let go of (unmount, then the snapshot's
    // release: 0.3 s for btrfs to destroy the bench's snapshot) while the manifest is
    // written, the run recorded and its index saved, not after. Both threads end before
    // this run does, whatever fails.
    let releasing = (job.verify_every == 0).then(|| std::mem::take(held));
    let (recorded, errs) = std::thread::scope(|s| {
        let span = tracing::Span::current();
        let release = releasing.map(|mut h| s.spawn(move || span.in_scope(|| h.release())));
        let recorded =
            crate::verify::write_manifest(runner, target, stamp, &scratch.path, &sha1_file)
                .context("writing the manifest of the view")
                .and_then(|written| {
                    record_and_index(
                        runner, cfg, job, target, stamp, &out, &written, &link, index,
                    )
                    .map(|()| written)
                });
        let errs = release
            .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .unwrap_or_default();
        (recorded, errs)
    });
    recorded?;
    if !errs.is_empty() {
        bail!("cleanup failed: {}", errs.join("; "));
    }
    if job.verify_every > 0 {
        let runs = target.scan(runner)?.points.len() as u32;
        if runs.is_multiple_of(job.verify_every) {
            let data = std::fs::read(&sha1_file)
                .with_context(|| format!("reading {}", sha1_file.display()))?;
            let want = crate::manifest::parse("the run's manifest", &data)?
                .into_iter()
                .map(|e| (e.path, e.sha1))
                .collect();
            let r = crate::verify::check_view_against_target(runner, target, &mp, &want)?;
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

/// A night of files rewritten in place, written into the local `current/` by this
/// process ([`crate::target::update`]): what was sent and the sums of what was written,
/// or `None` (the log says why) when rsync must send it.
fn rewrite_here(
    core: &crate::view::ViewCore,
    current: &std::path::Path,
    generation: &std::path::Path,
    list: &[Vec<u8>],
    work: &std::path::Path,
) -> Result<Option<(crate::target::rsync::Outcome, crate::target::update::Sums)>> {
    use crate::target::{rsync, update};
    if let Some(why) = update::plan(list) {
        tracing::info!("rsync sends this night: {why}");
        return Ok(None);
    }
    let Some(u) = update::run(core, current, generation, list, &update::journal(work))
        .context("writing the changed files into current/")?
    else {
        return Ok(None);
    };
    tracing::info!(
        files = u.files,
        bytes = u.bytes,
        unchanged = u.same,
        "wrote the changed files into current/ in process"
    );
    let mut sent = crate::manifest::PathSet::new();
    for (p, _) in &u.sums {
        sent.insert(p);
    }
    sent.seal();
    let out = rsync::Outcome {
        stats: rsync::Stats {
            files_transferred: u.files,
            bytes_sent: u.bytes,
            total_size: u.bytes,
        },
        sent,
        items: u.files as usize,
        ..Default::default()
    };
    Ok(Some((out, u.sums)))
}

/// A failed run or pull: logs the error and runs the on-failure hooks with it in their
/// environment; returns the message for the status.
pub(crate) fn on_failure(
    runner: &dyn Runner,
    job: &Job,
    env: &mut HookEnv,
    e: &anyhow::Error,
) -> String {
    let msg = crate::error::chain(e.as_ref());
    tracing::error!("failed: {msg}");
    env.set("SNAPVEIL_RESULT", "failure");
    env.set("SNAPVEIL_ERROR", &msg);
    if let Err(he) = hooks::run_phase(runner, &job.hooks, Phase::OnFailure, env) {
        tracing::error!("{he}");
    }
    msg
}

/// Pre-snapshot hooks (held ones kept until the snapshot exists) → snapshot →
/// post-snapshot hooks: the frozen tree's path; the snapshot is left in `held`. Shared
/// by a run and a pull (crate::pull).
///
/// # Errors
/// A hook failing or the snapshot not taken.
#[allow(clippy::result_large_err)]
pub(crate) fn freeze<'a>(
    runner: &'a dyn Runner,
    cfg: &Config,
    job: &Job,
    stamp: &str,
    env: &mut HookEnv,
    held: &mut Held<'a>,
) -> Result<PathBuf> {
    hooks::run_phase(runner, &job.hooks, Phase::PreSnapshot, env)?;
    held.hooks = hooks::start_held(runner, &job.hooks, env)?;
    check_cancel()?;
    let guard = take_snapshot(runner, cfg, job, stamp)
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
    Ok(snap_path)
}

/// Regular files of the view whose ctime is at or after `since` (unix seconds; `None`:
/// every file), minus those rsync just sent: the files whose change the quick check may
/// have missed. A snapshot keeps ctimes, and a ctime cannot be set back, so a file
/// rewritten in the second of the last backup, or given its old mtime again, shows here.
fn changed_since(
    walk: &crate::verify::ViewWalk,
    since: Option<i64>,
    sent: &crate::manifest::PathSet,
) -> Result<Vec<Vec<u8>>, crate::verify::VerifyError> {
    let mut out = Vec::new();
    for f in walk.files()? {
        let (rel, ctime) = f?;
        if !sent.contains(&rel) && since.is_none_or(|s| ctime >= s) {
            out.push(rel);
        }
    }
    // In path order already, as the walk is.
    Ok(out)
}

/// The job's snapshot (`snapveil-JOB-STAMP`), the first half of the snapshot → view
/// sequence that a run and `verify` share.
///
/// # Errors
/// The provider could not take it.
#[allow(clippy::result_large_err)] // the provider's own error type, as in crate::snapshot
pub fn take_snapshot<'a>(
    runner: &'a dyn Runner,
    cfg: &Config,
    job: &Job,
    stamp: &str,
) -> Result<SnapshotGuard<'a>, snapshot::SnapshotError> {
    snapshot::take(
        runner,
        &job.name,
        stamp,
        &job.source,
        &job.snapshot,
        &cfg.tools.snapshot,
        &snapshot::cmd::work_dir(&cfg.state_dir, &job.name),
    )
}

/// The encrypted view of a snapshot at `mp` (a stale mount there, left by a killed
/// process, is removed first), with the job's excludes: the second half. `frozen` is
/// the snapshot's consistency: a `dir:` source is live and gets short kernel caching.
///
/// # Errors
/// Mounting failed.
pub fn mount_view(
    job: &Job,
    snap: &Path,
    frozen: bool,
    mp: &Path,
    key: KeyConfig,
    master: crate::crypto::MasterKey,
) -> Result<MountedView, crate::view::mount::MountError> {
    view::cleanup_stale_mount(mp)?;
    std::fs::create_dir_all(mp).map_err(|source| crate::view::mount::MountError::Mountpoint {
        path: mp.to_path_buf(),
        source,
    })?;
    // A view of a whole filesystem must not show its own mountpoint (recursion) or
    // the key directory: both are named by their live path, and a snapshot holds them
    // at the same place relative to its root.
    let mut excludes = job.excludes.clone();
    let live = match &job.source {
        snapshot::Source::Btrfs { subvolume } => Some(subvolume.as_path()),
        snapshot::Source::Dir { path } => Some(path.as_path()),
        _ => None,
    };
    if let Some(live) = live {
        excludes.extend(view::mount::self_excludes(
            live,
            mp,
            &[&job.key_config, &job.passfile],
        ));
    }
    MountedView::mount(
        snap,
        mp,
        ViewOptions {
            key,
            master,
            excludes,
            access: view::Access::default(),
            caching: if frozen {
                view::fuse::Caching::Frozen
            } else {
                view::fuse::Caching::Live
            },
        },
    )
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
    if job.mode == Mode::ZfsRaw {
        // A raw job keeps its newest sent snapshot on purpose (the next increment's base);
        // an unsent one left by a crash goes with the next successful send.
        let scratch = crate::scratch::sweep(&work);
        removed.extend(scratch.iter().map(|p| format!("scratch {}", p.display())));
        return Ok(removed);
    }
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
    let target = Target::for_job(cfg, job);
    if let Some(current) = target.current_here() {
        let tmp = crate::target::update::sweep_leftovers(&work, &current);
        removed.extend(
            tmp.iter()
                .map(|p| format!("temporary file {}", p.display())),
        );
    }
    let scratch = crate::scratch::sweep(&work);
    removed.extend(scratch.iter().map(|p| format!("scratch {}", p.display())));
    let tmp = target.sweep_tmp_files();
    removed.extend(
        tmp.iter()
            .map(|p| format!("temporary file {}", p.display())),
    );
    // The index of a run killed before it was recorded (it would only be overwritten).
    if let Some(p) = changes::remove_pending(&changes::index_path(&cfg.state_dir, &job.name))
        .context("removing the index of an unrecorded run")?
    {
        removed.push(format!("unrecorded index {}", p.display()));
    }
    Ok(removed)
}

pub(crate) fn check_cancel() -> Result<()> {
    if crate::signals::cancelled() {
        let sig = crate::signals::last_signal()
            .and_then(|s| nix::sys::signal::Signal::try_from(s).ok())
            .map(|s| s.as_str())
            .unwrap_or("a signal");
        bail!("interrupted by {sig}");
    }
    Ok(())
}

/// Where a raw run sends: a `zfs://` receiver (no records), or a directory target whose
/// sealed records were read and checked before anything was sent.
enum RawDest<'a> {
    Zfs {
        rx: crate::zfs_send::receive::Receiver<'a>,
        prepared: crate::zfs_send::receive::Prepared,
    },
    Dir {
        scan: crate::zfs_send::record::Scan,
        link: crate::target::chain::Next,
    },
}

/// A raw ZFS run ([`crate::zfs_send`]): hooks and the snapshot as in file mode, but the
/// snapshot is kept after a successful send (the next increment's base), and no view is
/// mounted.
#[allow(clippy::result_large_err)]
#[allow(clippy::too_many_arguments)]
fn raw_steps(
    runner: &dyn Runner,
    cfg: &Config,
    job: &Job,
    opts: RunOptions,
    target: &Target,
    stamp_out: &mut String,
    env: &mut HookEnv,
    held: &mut Held<'_>,
) -> Result<Success> {
    use crate::zfs_send;
    let snapshot::Source::Zfs { dataset } = &job.source else {
        bail!("mode zfs-raw needs a zfs: source, not {}", job.source);
    };
    let tools = &cfg.tools.snapshot;
    // A zfs:// target (zfs_send::receive) is a dataset, not a directory of stream files:
    // no records, no record key.
    let chain =
        |e: &(dyn std::error::Error + 'static)| anyhow::anyhow!(crate::error::Chain(e).to_string());
    let raw_opts = job.raw.clone().unwrap_or_default();
    // A plain dataset without age keys (or, to a zfs:// target, any plain dataset) fails
    // here, before any hook freezes anything.
    let enc = zfs_send::encryption(runner, tools, dataset).map_err(|e| chain(&e))?;
    let tree = |opts: &crate::config::RawOptions| {
        zfs_send::source::tree_protection(runner, tools, opts, dataset).map_err(|e| chain(&e))
    };
    let (dest, contents) = match target.address().zfs() {
        Some(z) => {
            let rx = zfs_send::receive::Receiver::for_job(runner, cfg, job, z);
            let p = zfs_send::receive::prepare(&rx, job, dataset, enc.as_ref())
                .map_err(|e| chain(&e))
                .with_context(|| format!("preparing the receive into {}", rx.addr))?;
            // The children too: `zfs send -w -R` would send a plain child as plaintext.
            if job.snapshot.recursive {
                tree(&raw_opts)?;
            }
            let contents = p.contents.clone();
            (RawDest::Zfs { rx, prepared: p }, contents)
        }
        None => {
            // The record key first, as in file mode: a wrong password fails before any
            // snapshot.
            let key = KeyConfig::load(&job.key_config).context("loading the key config")?;
            let master = key
                .unlock_with_passfile(&job.passfile)
                .context("unlocking the key config (the key of the job's stream records)")?;
            target.set_auth(crate::crypto::RecordKey::new(&master));
            drop(master);
            let contents = target.scan(runner).context("reading the target")?;
            if let Some(p) = contents.points.last() {
                bail!(
                    "{} holds file-mode restore points (runs/{p}.json): give the raw job a target of its own",
                    target.address()
                );
            }
            if job.snapshot.recursive {
                tree(&raw_opts)?;
            } else {
                zfs_send::protection(enc.as_ref(), &raw_opts, dataset).map_err(|e| chain(&e))?;
            }
            let scan = zfs_send::record::scan(runner, target, &job.name)
                .map_err(|e| chain(&e))
                .context("reading the target's stream records")?;
            // Sealed and complete before anything is sent (issue 14).
            let link = check_chain(
                cfg,
                job,
                opts,
                target,
                |st| scan.verdict(st),
                scan.unsealed().len(),
            )?;
            let contents = scan.contents();
            (RawDest::Dir { scan, link }, contents)
        }
    };
    let stamp = crate::target::new_stamp(&target.address().to_string(), &contents)?;
    let stamp = stamp.as_str();
    tracing::Span::current().record("stamp", stamp);
    *stamp_out = stamp.to_string();
    env.set("SNAPVEIL_STAMP", stamp);
    check_cancel()?;

    hooks::run_phase(runner, &job.hooks, Phase::PreSnapshot, env)?;
    held.hooks = hooks::start_held(runner, &job.hooks, env)?;
    check_cancel()?;
    let snap = snapshot::snapshot_name(&job.name, stamp);
    let full = format!("{dataset}@{snap}");
    let mut take = crate::exec::Cmd::new(&tools.zfs).arg("snapshot");
    if job.snapshot.recursive {
        take = take.arg("-r");
    }
    take.arg(&full)
        .run_checked(runner)
        .with_context(|| format!("taking the snapshot {full}"))?;
    env.set("SNAPVEIL_SNAPSHOT_NAME", &snap);
    for h in std::mem::take(&mut held.hooks) {
        h.finish()
            .context("the held pre-snapshot hook did not hold until the snapshot was taken")?;
    }
    // What was sent: bytes, and for a directory target the chain head its record made.
    let sent = hooks::run_phase(runner, &job.hooks, Phase::PostSnapshot, env)
        .map_err(anyhow::Error::from)
        .and_then(|()| check_cancel())
        .and_then(|()| match &dest {
            RawDest::Zfs { rx, prepared: p } => zfs_send::receive::send(
                rx,
                &raw_opts,
                &p.on_target,
                dataset,
                &snap,
                p.raw,
                job.snapshot.recursive,
            )
            .map(|r| (r.bytes + p.resumed, None))
            .map_err(|e| chain(&e))
            .with_context(|| format!("sending {full} to {}", rx.addr)),
            RawDest::Dir { link, .. } => zfs_send::send(
                runner,
                tools,
                job,
                target,
                dataset,
                &snap,
                stamp,
                job.snapshot.recursive,
                link,
            )
            .map(|s| (s.record.bytes, Some(s.head)))
            .map_err(|e| chain(&e))
            .context("sending the stream"),
        });
    let (bytes_sent, head) = match sent {
        Ok(s) => s,
        Err(e) => {
            // What the failed send left on a zfs:// target, which the next run completes
            // from this snapshot: then it stays.
            let kept = match &dest {
                RawDest::Zfs { rx, .. } => {
                    zfs_send::receive::left_on_target(rx, job.snapshot.recursive, &snap)
                        .unwrap_or_else(|le| {
                            tracing::warn!("could not ask the target what it kept: {le}");
                            Some("the target could not be asked what it kept")
                        })
                }
                RawDest::Dir { .. } => None,
            };
            if let Some(why) = kept {
                tracing::warn!(
                    "{full} is kept: {why}, and the next run completes the transfer from it"
                );
                return Err(e);
            }
            // Not sent: this snapshot is nobody's base.
            let mut d = crate::exec::Cmd::new(&tools.zfs).arg("destroy");
            if job.snapshot.recursive {
                d = d.arg("-r");
            }
            if let Err(de) = d.arg(&full).run_checked(runner) {
                tracing::error!("{de}");
            }
            return Err(e);
        }
    };
    if let Some(head) = &head {
        crate::target::chain::save_state(
            &cfg.state_dir,
            &job.name,
            &target.address().to_string(),
            head,
        )
        .context("recording the run in the agent's chain state")?;
    }
    // The target's restore points before this run: a snapshot of this job not among them
    // was left unsent by a killed run.
    let sent_before: Vec<String> = match &dest {
        RawDest::Dir { scan, .. } => scan.points.iter().map(|r| r.stamp.clone()).collect(),
        // This job's snapshots on the zfs:// target.
        RawDest::Zfs { .. } => contents.taken.iter().cloned().collect(),
    };
    zfs_send::after_send(
        runner,
        tools,
        job,
        dataset,
        &snap,
        job.snapshot.recursive,
        &sent_before,
    );
    // A directory target's streams are pruned after the run (run_job), as file mode's.
    if let (RawDest::Zfs { rx, .. }, true) = (&dest, job.retention.prune) {
        if let Some(d) = zfs_send::receive::prune(rx, job, dataset, false)
            .context("the backup is complete, but pruning the target's snapshots failed")?
        {
            for line in zfs_send::receive::report(rx.addr, &d, false).lines() {
                tracing::info!("{line}");
            }
        }
    }
    Ok(Success {
        bytes_sent,
        files: 1,
        vanished: false,
        consistent: true,
    })
}

/// Checks the target's records ([`crate::target::chain`]) against what this machine last
/// wrote there, and says where this run's record goes in the chain. Problems stop the
/// run unless the flag naming each was given; an accepted one restarts the chain check
/// at this run (its record's `base`).
///
/// `verdict` checks the records (file mode's `runs/`, raw mode's `streams/`) against
/// the state; `unsealed` counts the restore points of an older snapveil.
///
/// # Errors
/// A tampered, truncated or rolled-back target not accepted, or unreadable state.
fn check_chain(
    cfg: &Config,
    job: &Job,
    opts: RunOptions,
    target: &Target,
    verdict: impl FnOnce(Option<&crate::target::chain::Head>) -> crate::target::chain::Verdict,
    unsealed: usize,
) -> Result<crate::target::chain::Next> {
    let state =
        crate::target::chain::load_state(&cfg.state_dir, &job.name, &target.address().to_string())?;
    let v = verdict(state.as_ref());
    for w in &v.warnings {
        tracing::warn!("{}: {w}", target.address());
    }
    if unsealed > 0 {
        tracing::warn!(
            "{}: {unsealed} restore point(s) unauthenticated (older version of snapveil, no MAC)",
            target.address(),
        );
    }
    let refused: Vec<String> = v
        .problems
        .iter()
        .filter(|p| {
            !(if p.is_rollback() {
                opts.accept_rollback
            } else {
                opts.accept_truncation
            })
        })
        .map(|p| format!("{p} (accept with {})", p.flag()))
        .collect();
    if !refused.is_empty() {
        bail!(
            "{}: refusing to back up into this target, nothing was transferred:\n  {}",
            target.address(),
            refused.join("\n  ")
        );
    }
    for p in &v.problems {
        tracing::warn!("{}: accepted by {}: {p}", target.address(), p.flag());
    }
    // After an accepted rollback the count goes on from what this machine wrote, so no
    // counter names two different records of ours.
    let counter = v
        .head
        .as_ref()
        .map(|h| h.counter)
        .max(state.as_ref().map(|s| s.counter))
        .map_or(1, |n| n + 1);
    Ok(crate::target::chain::Next {
        counter,
        prev: v.head.as_ref().map(|h| h.mac.clone()),
        base: match &v.head {
            Some(h) if v.problems.is_empty() => h.base,
            _ => counter,
        },
    })
}

/// Records the run on the target and in the agent's chain state, then saves the index
/// of this run: only once the restore point is recorded may the next run trust it. A
/// failure to save the index only costs the next run a full pass.
#[allow(clippy::too_many_arguments)]
fn record_and_index(
    runner: &dyn Runner,
    cfg: &Config,
    job: &Job,
    target: &Target,
    stamp: &str,
    out: &crate::target::Outcome,
    written: &crate::verify::Written,
    link: &crate::target::chain::Next,
    index: Option<changes::Pending>,
) -> Result<()> {
    let head = record_run(runner, target, job, stamp, out, written, link)?;
    crate::target::chain::save_state(
        &cfg.state_dir,
        &job.name,
        &target.address().to_string(),
        &head,
    )
    .context("recording the run in the agent's chain state")?;
    match index.map(changes::Pending::commit) {
        Some(Ok(entries)) => tracing::debug!(entries, "saved the index of this run"),
        Some(Err(e)) => tracing::warn!("{e}: the next run will do a full pass"),
        None => {}
    }
    Ok(())
}

/// Writes `TARGET/runs/STAMP.json`, sealed, with the MACs of its manifests and its link
/// in the chain: the run is now a restore point. Returns what the agent remembers.
fn record_run(
    runner: &dyn Runner,
    target: &Target,
    job: &Job,
    stamp: &str,
    out: &crate::target::Outcome,
    written: &crate::verify::Written,
    link: &crate::target::chain::Next,
) -> Result<crate::target::chain::Head> {
    let rec = crate::target::RunRecord {
        stamp: stamp.to_string(),
        job: Some(job.name.clone()),
        finished: Some(Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)),
        bytes_sent: out.stats.bytes_sent,
        files: out.stats.files_transferred,
        counter: Some(link.counter),
        prev: link.prev.clone(),
        base: Some(link.base),
        sha1_mac: written.sha1_mac.clone(),
        meta_mac: written.meta_mac.clone(),
    };
    let body = serde_json::to_vec_pretty(&rec).expect("json");
    let data = target.seal(&body);
    let key = target.auth().context("the record key is not set")?;
    let mac = match crate::target::chain::open(Some(key), &data) {
        crate::target::chain::Opened::Authentic(_, m) => hex::encode(m),
        _ => bail!("sealing the run record failed"),
    };
    target
        .put(runner, Area::Runs, &format!("{stamp}.json"), &data)
        .context("recording the run on the target")?;
    Ok(crate::target::chain::Head {
        stamp: stamp.to_string(),
        counter: link.counter,
        mac,
    })
}
