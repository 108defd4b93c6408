//! The backup target of a job, as one handle ([`Target`]) opened once per command: it
//! owns the layout (`current/`, `generations/STAMP/`, `runs/STAMP.json`,
//! `manifests/STAMP.{sha1,meta}`: [`layout`]), the ways to reach it (`std::fs` on a local
//! path; rsync over ssh with a shell, over an rrsync-restricted key, or to a daemon:
//! [`rsync`]), and the operations that run, verify, restore, prune and list need. Callers
//! never ask which kind of target they hold; the one `match` on it is here.
//!
//! A target is storage we do not control. Before anything is written or deleted, its
//! layout is checked (an area that is a symlink is refused: rsync `--backup-dir`, prune's
//! renames and deletions would follow it), its records are read and classified (junk is
//! no restore point; another job's record stops the command), and a new run's stamp is
//! made newer than everything it names ([`layout::new_stamp`]). With the job's record
//! key ([`Target::with_auth`]) records are sealed when written and their seals, the
//! manifests' MACs and the chain of runs are checked when read ([`chain`], issue 14).
//!
//! Raw ZFS mode will add targets of another family (`zfs receive` over ssh, stream files
//! on a directory target) beside this one.

mod address;
pub mod chain;
pub mod layout;
pub mod ops;
pub mod rsync;
pub mod seed;
pub mod update;

pub use address::{check_dataset, Address, ZfsAddress};
pub use layout::{new_stamp, Area, Contents, RecordFile, RunRecord};
pub use ops::{Mode, Op};
pub use rsync::{Ended, Outcome, Pass, RsyncError, Stats};

use crate::exec::{Cmd, Runner};
use rsync::Endpoint;
use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error(
        "{target}/{area} is a symlink{to}: refusing to write, merge or delete through it \
         (every area of a target must be a real directory inside it)"
    )]
    Symlink {
        target: String,
        area: &'static str,
        to: String,
    },
    #[error("{target}/{area} exists but is not a directory: not a snapveil target layout")]
    NotADirectory { target: String, area: &'static str },
    #[error(
        "{target}/runs/{file} is a record of job {other:?}, not of {job:?}: this target (or \
         its runs/) belongs to another job; refusing to use or change it"
    )]
    ForeignRecord {
        target: String,
        file: String,
        job: String,
        other: String,
    },
    #[error(
        "{target} already holds {entry}, not older than this run's stamp {now}: the system \
         clock is behind the backups (a timer that fired before NTP set the clock?). \
         Refusing to run, so that no restore point is overwritten or pruned by mistake. Fix \
         the clock; if it is right, {entry} came from a clock that ran ahead: move it out \
         of the target"
    )]
    ClockBehind {
        target: String,
        entry: String,
        now: String,
    },
    #[error("{target}/current {what}; refusing to rsync --delete into it (wrong target, or another job's backup?)")]
    NotOurs { target: String, what: &'static str },
    #[error("{target}: not a snapveil target (neither runs/ nor generations/ exists)")]
    NotATarget { target: String },
    #[error(
        "{path}: refusing to overwrite an existing entry (did the target change during prune?)"
    )]
    Exists { path: PathBuf },
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    #[error(transparent)]
    Rsync(#[from] RsyncError),
    #[error("{target}: cannot parse `rsync --list-only` line {line:?}")]
    ListParse { target: String, line: String },
    #[error("{target}/{file}: TAMPERED: {why}; not used")]
    Tampered {
        target: String,
        file: String,
        why: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TargetError + '_ {
    move |err| TargetError::Io {
        path: path.into(),
        err,
    }
}

/// A job's target, opened for one command.
pub struct Target {
    address: Address,
    ep: Endpoint,
    /// Private scratch space for this process (`STATE/work/JOB`): fetched records,
    /// uploads, lists for `--files-from`.
    scratch: PathBuf,
    /// The job whose target this is: its records must name it. `None` for `prune
    /// --target`, which knows no job.
    job: Option<String>,
    /// ssh program and options, for a shell on an ssh target.
    ssh: Vec<String>,
    /// Whether the ssh key may run a shell (merges by renames) or only `rsync --server`
    /// (rrsync, a forced command): probed once, unless the caller said.
    shell: OnceLock<bool>,
    /// The job's record key: seals are made and checked ([`chain`]). `None` for `prune
    /// --target` (no key; seals are kept but not checked) and for cleanup.
    auth: OnceLock<crate::crypto::RecordKey>,
}

/// A scratch directory of this process, removed on drop.
struct Scratch(PathBuf);

/// File path (relative to `current/`) → sha1, as a manifest or a hashing pass has them.
pub type Sums = std::collections::BTreeMap<Vec<u8>, [u8; 20]>;

/// A file being written for the target; see [`Target::upload`].
pub struct Upload {
    file: Option<fs::File>,
    tmp: PathBuf,
    area: Area,
    local_dest: Option<PathBuf>,
    _scratch: Option<Scratch>,
}

impl Upload {
    pub fn file(&mut self) -> &mut fs::File {
        self.file.as_mut().expect("file present until commit")
    }

    /// Makes the file durable and gives it its name on the target.
    ///
    /// # Errors
    /// Syncing, renaming or uploading failed; the name then does not exist.
    pub fn commit(mut self, runner: &dyn Runner, target: &Target) -> Result<(), TargetError> {
        let file = self.file.take().expect("file present until commit");
        file.sync_all().map_err(io(&self.tmp))?;
        drop(file);
        match self.local_dest.take() {
            Some(dest) => {
                fs::rename(&self.tmp, &dest).map_err(io(&dest))?;
                if let Some(dir) = dest.parent() {
                    fs::File::open(dir)
                        .and_then(|d| d.sync_all())
                        .map_err(io(dir))?;
                }
                Ok(())
            }
            None => target.send_file(runner, self.area, &self.tmp),
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.local_dest.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// A target file readable here; a fetched copy is removed on drop.
pub struct LocalCopy {
    pub path: PathBuf,
    _scratch: Option<Scratch>,
}

impl LocalCopy {
    /// A copy that is a file of the test's own (not removed on drop).
    #[cfg(test)]
    pub(crate) fn at(path: PathBuf) -> Self {
        LocalCopy {
            path,
            _scratch: None,
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("removing {}: {e}", self.0.display());
            }
        }
    }
}

impl Target {
    /// `ssh` is the ssh command line (program and options) used for ssh targets.
    pub fn open(
        address: Address,
        rsync: impl AsRef<OsStr>,
        ssh: Vec<String>,
        scratch: PathBuf,
        job: Option<&str>,
    ) -> Target {
        let is_ssh = matches!(address, Address::Ssh { .. });
        let ep = Endpoint::new(
            rsync,
            is_ssh.then_some(ssh.as_slice()),
            address.rsync_dest(""),
            address.to_string(),
        );
        Target {
            address,
            ep,
            scratch,
            job: job.map(str::to_string),
            ssh,
            shell: OnceLock::new(),
            auth: OnceLock::new(),
        }
    }

    /// With the job's record key: records are sealed when written and checked when read.
    pub fn with_auth(self, key: crate::crypto::RecordKey) -> Target {
        self.set_auth(key);
        self
    }

    /// [`Target::with_auth`] once the key is unlocked (a run opens its target first); a
    /// second key is ignored.
    pub fn set_auth(&self, key: crate::crypto::RecordKey) {
        let _ = self.auth.set(key);
    }

    pub fn auth(&self) -> Option<&crate::crypto::RecordKey> {
        self.auth.get()
    }

    /// `body` sealed with the record key (as is without one).
    pub fn seal(&self, body: &[u8]) -> Vec<u8> {
        match self.auth.get() {
            Some(k) => chain::seal(k, body),
            None => body.to_vec(),
        }
    }

    /// The MAC (hex) of a manifest's bytes, for its run record.
    pub fn mac_hex(&self, data: &[u8]) -> Option<String> {
        self.auth.get().map(|k| hex::encode(k.mac(data)))
    }

    /// Checks a restore point's manifest (`manifests/STAMP.sha1` or `.meta`, by its
    /// extension `ext`) against the MAC its sealed record carries. An unsealed point's
    /// manifests (older snapveil) pass with a warning.
    ///
    /// # Errors
    /// [`TargetError::Tampered`] naming the file: the MAC differs, or the record has none.
    pub fn check_manifest(
        &self,
        contents: &Contents,
        stamp: &str,
        ext: &str,
        data: &[u8],
    ) -> Result<(), TargetError> {
        self.check_manifest_by(contents, stamp, ext, |k, tag| k.verify(data, tag))
    }

    /// `manifests/STAMP.EXT` as a file of this process's own scratch, checked on the way
    /// in as [`Target::check_manifest`] checks it: what was checked is what is read
    /// later, whatever the target's copy becomes meanwhile, and the file is never held
    /// whole (a big tree's manifest is about 100 bytes a file). `None` when missing.
    ///
    /// # Errors
    /// As [`Target::check_manifest`], or the copy fails.
    pub fn checked_manifest_copy(
        &self,
        runner: &dyn Runner,
        contents: &Contents,
        stamp: &str,
        ext: &str,
    ) -> Result<Option<LocalCopy>, TargetError> {
        use std::io::{Read, Write};
        let name = format!("{stamp}.{ext}");
        let Some(LocalCopy {
            path: src,
            _scratch: fetched,
        }) = self.local_copy(runner, Area::Manifests, &name)?
        else {
            return Ok(None);
        };
        let dir = self.scratch("prev")?;
        let path = dir.0.join(&name);
        let mut mac = self.auth.get().map(|k| k.start());
        // A fetched file is a copy of ours already, but in a scratch dir the next fetch
        // empties: moved. A local target's own file is copied.
        let (from, mut copy) = if fetched.is_some() {
            fs::rename(&src, &path).map_err(io(&path))?;
            (&path, None)
        } else {
            (&src, Some(fs::File::create(&path).map_err(io(&path))?))
        };
        let mut r = fs::File::open(from).map_err(io(from))?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = r.read(&mut buf).map_err(io(from))?;
            if n == 0 {
                break;
            }
            if let Some(m) = mac.as_mut() {
                m.update(&buf[..n]);
            }
            if let Some(w) = copy.as_mut() {
                w.write_all(&buf[..n]).map_err(io(&path))?;
            }
        }
        drop(fetched);
        self.check_manifest_by(contents, stamp, ext, |_, tag| {
            mac.is_some_and(|m| m.verify(tag))
        })?;
        Ok(Some(LocalCopy {
            path,
            _scratch: Some(dir),
        }))
    }

    /// A file `name` of this process's own scratch (kind `what`), for what a run
    /// prepares now and sends later: removed on drop.
    ///
    /// # Errors
    /// The scratch directory cannot be made.
    pub fn staged(&self, what: &str, name: &str) -> Result<LocalCopy, TargetError> {
        let dir = self.scratch(what)?;
        Ok(LocalCopy {
            path: dir.0.join(name),
            _scratch: Some(dir),
        })
    }

    /// [`Target::check_manifest`] with `verify` saying whether the MAC matches.
    fn check_manifest_by(
        &self,
        contents: &Contents,
        stamp: &str,
        ext: &str,
        verify: impl FnOnce(&crate::crypto::RecordKey, &[u8; 32]) -> bool,
    ) -> Result<(), TargetError> {
        let file = format!("manifests/{stamp}.{ext}");
        let Some((rec, _)) = contents.sealed.get(stamp) else {
            if self.auth.get().is_some() {
                tracing::warn!(
                    "{}/{file}: unauthenticated (made by an older snapveil): used as is",
                    self.address
                );
            }
            return Ok(());
        };
        let want = if ext == "sha1" {
            &rec.sha1_mac
        } else {
            &rec.meta_mac
        };
        let ok = match (want, self.auth.get()) {
            (Some(w), Some(k)) => {
                let mut tag = [0u8; 32];
                hex::decode_to_slice(w, &mut tag).is_ok() && verify(k, &tag)
            }
            (None, _) => false,
            (Some(_), None) => true,
        };
        if ok {
            Ok(())
        } else {
            Err(TargetError::Tampered {
                target: self.address.to_string(),
                file,
                why: if want.is_some() {
                    format!("its contents do not match the MAC in runs/{stamp}.json")
                } else {
                    format!("runs/{stamp}.json carries no MAC for it")
                },
            })
        }
    }

    /// The target of a configured job.
    pub fn for_job(cfg: &crate::config::Config, job: &crate::config::Job) -> Target {
        let mut ssh = vec![cfg.tools.ssh.to_string_lossy().into_owned()];
        ssh.extend(job.ssh_args.iter().cloned());
        Target::open(
            job.target.clone(),
            &cfg.tools.rsync,
            ssh,
            crate::snapshot::cmd::work_dir(&cfg.state_dir, &job.name),
            Some(&job.name),
        )
    }

    /// Says whether an ssh key may run a shell, instead of probing (`prune --rsync-only`).
    pub fn assume_shell(self, shell: bool) -> Target {
        let _ = self.shell.set(shell);
        self
    }

    pub fn address(&self) -> &Address {
        &self.address
    }

    /// The job whose target this is, if known.
    pub fn job(&self) -> Option<&str> {
        self.job.as_deref()
    }

    fn local(&self) -> Option<&Path> {
        match &self.address {
            Address::Local(p) => Some(p),
            _ => None,
        }
    }

    fn scratch(&self, what: &str) -> Result<Scratch, TargetError> {
        debug_assert!(
            crate::scratch::KINDS.contains(&what),
            "{what}: not a swept kind"
        );
        let d = self.scratch.join(crate::scratch::name(what));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).map_err(io(&d))?;
        Ok(Scratch(d))
    }

    fn area(&self, a: Area, name: &str) -> String {
        if name.is_empty() {
            format!("{}/", a.dir())
        } else {
            format!("{}/{name}", a.dir())
        }
    }

    // ---- layout and records -----------------------------------------------------------

    /// Reads what the target holds, checking its layout first.
    ///
    /// # Errors
    /// A symlinked area, another job's record, or the target cannot be read.
    pub fn scan(&self, runner: &dyn Runner) -> Result<Contents, TargetError> {
        let shown = self.address.to_string();
        let names = self.top_names(runner)?;
        let manifests: BTreeSet<String> = names
            .iter()
            .filter(|(a, n)| *a == Area::Manifests && n.ends_with(".sha1"))
            .filter_map(|(_, n)| layout::stamp_of(n).map(str::to_string))
            .collect();
        let stamps: Vec<String> = names
            .iter()
            .filter(|(a, _)| *a == Area::Runs)
            .filter_map(|(_, n)| {
                n.strip_suffix(".json")
                    .filter(|s| crate::snapshot::valid_stamp(s))
                    .map(str::to_string)
            })
            .collect();
        let has_ledger = names
            .iter()
            .any(|(a, n)| *a == Area::Runs && n == chain::LEDGER);
        let (records, ledger) = self.read_records(runner, &stamps, has_ledger)?;
        let layout::Classified {
            points,
            ignored,
            mut tampered,
            sealed,
            unchecked,
        } = layout::classify(
            &shown,
            records,
            &manifests,
            self.job.as_deref(),
            self.auth.get(),
        )?;
        for (f, why) in &ignored {
            tracing::warn!("{shown}/{f}: not a restore point: {why} (left alone)");
        }
        let ledger = match ledger.as_deref().map(|d| chain::open(self.auth.get(), d)) {
            Some(chain::Opened::Authentic(b, _)) => match serde_json::from_slice(b) {
                Ok(l) => Some(l),
                Err(e) => {
                    tampered.push((
                        format!("runs/{}", chain::LEDGER),
                        format!("sealed but not a prune record ({e})"),
                    ));
                    None
                }
            },
            Some(chain::Opened::Unchecked(_)) | None => None,
            Some(_) => {
                tampered.push((
                    format!("runs/{}", chain::LEDGER),
                    "its MAC does not match its contents (or it has none)".into(),
                ));
                None
            }
        };
        for (f, why) in &tampered {
            tracing::error!("{shown}/{f}: TAMPERED: {why}");
        }
        let mut c = Contents::default();
        // Restore points first, so that an error names a record rather than its manifest.
        for p in &points {
            c.note(p, format!("runs/{p}.json"));
        }
        for (area, name) in &names {
            let stamp = match area {
                Area::Generations => crate::snapshot::valid_stamp(name).then_some(name.as_str()),
                Area::Runs => continue,
                _ => layout::stamp_of(name),
            };
            if let Some(s) = stamp {
                c.note(s, format!("{}/{name}", area.dir()));
            }
        }
        c.taken = ignored
            .iter()
            .chain(&tampered)
            .filter_map(|(f, _)| layout::stamp_of(f.strip_prefix("runs/")?).map(str::to_string))
            .collect();
        c.points = points;
        c.ignored = ignored;
        c.tampered = tampered;
        c.sealed = sealed;
        c.ledger = ledger;
        c.unchecked = unchecked;
        Ok(c)
    }

    /// The entries directly inside `runs/`, `manifests/` and `generations/`, after
    /// checking that no area is a symlink or a non-directory.
    fn top_names(&self, runner: &dyn Runner) -> Result<Vec<(Area, String)>, TargetError> {
        if let Some(root) = self.local() {
            layout::check_local_layout(root)?;
            let mut names = Vec::new();
            for a in [Area::Runs, Area::Manifests, Area::Generations] {
                let dir = root.join(a.dir());
                let rd = match fs::read_dir(&dir) {
                    Ok(rd) => rd,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io(&dir)(e)),
                };
                for e in rd {
                    let e = e.map_err(io(&dir))?;
                    names.push((a, e.file_name().to_string_lossy().into_owned()));
                }
            }
            return Ok(names);
        }
        let listing = self.root_listing(runner, &["/runs/*", "/manifests/*", "/generations/*"])?;
        let mut names = Vec::new();
        for e in &listing {
            let Some((top, name)) = layout::area_child(&e.name) else {
                continue;
            };
            if let Some(a) = Area::ALL.into_iter().find(|a| a.dir().as_bytes() == top) {
                names.push((a, String::from_utf8_lossy(name).into_owned()));
            }
        }
        Ok(names)
    }

    /// One recursive listing of a remote root: the areas' own entries (no trailing slash
    /// in the patterns, so that a symlink named like an area is listed too) and what
    /// `below` includes of their contents, after checking that no area is a symlink or
    /// a non-directory. A root that does not exist yet lists as empty.
    fn root_listing(
        &self,
        runner: &dyn Runner,
        below: &[&str],
    ) -> Result<Vec<rsync::ListEntry>, TargetError> {
        let cmd = self
            .ep
            .cmd()
            .args(["--list-only", "-rl"])
            .args(Area::ALL.map(|a| format!("--include=/{}", a.dir())))
            .args(below.iter().map(|p| format!("--include={p}")))
            .arg("--exclude=*")
            .arg(self.ep.dest(""));
        let listing = self.listing(runner, &cmd)?;
        layout::check_areas(&self.address.to_string(), |a| {
            listing
                .iter()
                .find(|e| e.name == a.dir().as_bytes())
                .map(|e| (e.kind, String::new()))
        })?;
        Ok(listing)
    }

    /// Runs an rsync `--list-only`; a path that does not exist lists as empty.
    fn listing(
        &self,
        runner: &dyn Runner,
        cmd: &Cmd,
    ) -> Result<Vec<rsync::ListEntry>, TargetError> {
        let (ended, out) = self.ep.run(runner, cmd)?;
        match ended {
            Ended::Missing => Ok(Vec::new()),
            _ => rsync::parse_listing(&out.stdout).map_err(|line| TargetError::ListParse {
                target: self.address.to_string(),
                line,
            }),
        }
    }

    /// `runs/STAMP.json` for each stamp (and prune's `runs/pruned.json` when `ledger`),
    /// read where they are (local) or copied to scratch first (rsync without `--links`
    /// skips a symlinked record, which then reads as not a regular file).
    fn read_records(
        &self,
        runner: &dyn Runner,
        stamps: &[String],
        ledger: bool,
    ) -> Result<(Vec<RecordFile>, Option<Vec<u8>>), TargetError> {
        let read_ledger = |dir: &Path| -> Result<Option<Vec<u8>>, TargetError> {
            let p = dir.join(chain::LEDGER);
            match fs::symlink_metadata(&p) {
                Ok(m) if ledger && m.is_file() => fs::read(&p).map(Some).map_err(io(&p)),
                _ => Ok(None),
            }
        };
        let read = |dir: &Path| -> Result<Vec<RecordFile>, TargetError> {
            let mut v = Vec::new();
            for s in stamps {
                let p = dir.join(format!("{s}.json"));
                let data = match fs::symlink_metadata(&p) {
                    Ok(m) if m.is_file() => Some(fs::read(&p).map_err(io(&p))?),
                    _ => None,
                };
                v.push(RecordFile {
                    stamp: s.clone(),
                    data,
                });
            }
            Ok(v)
        };
        if let Some(root) = self.local() {
            let dir = root.join(Area::Runs.dir());
            return Ok((read(&dir)?, read_ledger(&dir)?));
        }
        if stamps.is_empty() && !ledger {
            return Ok((Vec::new(), None));
        }
        let dir = self.scratch("records")?;
        let cmd = self
            .ep
            .cmd()
            .args(["--recursive", "--include=/*.json", "--exclude=*"])
            .arg(self.ep.dest(&self.area(Area::Runs, "")))
            .arg(format!("{}/", dir.0.display()));
        self.ep.run(runner, &cmd)?;
        Ok((read(&dir.0)?, read_ledger(&dir.0)?))
    }

    /// Refuses a target whose `current/` is not this job's backup: rsync `--delete` there
    /// would destroy someone else's data. Ours carries `gocryptfs.conf`, the job's key
    /// config byte for byte (`key_raw`). Returns whether `current/` is empty (missing or
    /// without an entry): then it holds nothing this run does not send.
    ///
    /// # Errors
    /// Another key's config, files without one, or the target cannot be read.
    pub fn check_owner(&self, runner: &dyn Runner, key_raw: &[u8]) -> Result<bool, TargetError> {
        let conf = crate::crypto::names::CONF_NAME;
        let refuse = |what| TargetError::NotOurs {
            target: self.address.to_string(),
            what,
        };
        match self.fetch(runner, Area::Current, conf)? {
            Some(b) if b == key_raw => Ok(false),
            Some(_) => Err(refuse("holds a gocryptfs.conf of another key config")),
            None if self.list(runner, Area::Current)?.is_empty() => Ok(true),
            None => Err(refuse(
                "exists but holds no gocryptfs.conf: it is not a snapveil backup",
            )),
        }
    }

    /// Removes the temp files of atomic writes (`.NAME.tmp-PID`) that a killed process
    /// left in `manifests/` and `runs/` of a local target; returns what it removed. (On
    /// remote targets rsync writes its own temp files and removes them.)
    pub fn sweep_tmp_files(&self) -> Vec<PathBuf> {
        let Some(root) = self.local() else {
            return Vec::new();
        };
        [Area::Manifests, Area::Runs]
            .into_iter()
            .flat_map(|a| crate::status::sweep_tmp_files(&root.join(a.dir())))
            .collect()
    }

    // ---- small files ------------------------------------------------------------------

    /// Writes `AREA/NAME` (atomically on a local target; by rsync, into a scratch copy
    /// first, otherwise).
    ///
    /// # Errors
    /// Writing or uploading failed.
    pub fn put(
        &self,
        runner: &dyn Runner,
        area: Area,
        name: &str,
        data: &[u8],
    ) -> Result<(), TargetError> {
        self.put_with(runner, area, name, |w| w.write_all(data))
    }

    /// [`Target::put_with`], returning the MAC (hex) of the exact bytes written when the
    /// target has a record key: what a sealed run record names for a manifest.
    ///
    /// # Errors
    /// As [`Target::put_with`].
    pub fn put_sealed_with(
        &self,
        runner: &dyn Runner,
        area: Area,
        name: &str,
        write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<Option<String>, TargetError> {
        struct Tee<'a> {
            inner: &'a mut dyn std::io::Write,
            mac: Option<&'a mut crate::crypto::RecordMac>,
        }
        impl std::io::Write for Tee<'_> {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let n = self.inner.write(buf)?;
                if let Some(m) = self.mac.as_mut() {
                    m.update(&buf[..n]);
                }
                Ok(n)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                self.inner.flush()
            }
        }
        let mut mac = self.auth.get().map(|k| k.start());
        self.put_with(runner, area, name, |w| {
            write(&mut Tee {
                inner: w,
                mac: mac.as_mut(),
            })
        })?;
        Ok(mac.map(|m| hex::encode(m.finish())))
    }

    /// [`Target::put`] of what `write` produces, streamed into the file (a local
    /// target's, or the upload's scratch copy), never held in memory as a whole.
    ///
    /// # Errors
    /// `write` failing, writing the file, or the transfer.
    pub fn put_with(
        &self,
        runner: &dyn Runner,
        area: Area,
        name: &str,
        write: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<(), TargetError> {
        if let Some(root) = self.local() {
            let p = root.join(area.dir()).join(name);
            return crate::status::write_atomic_with(&p, write).map_err(io(&p));
        }
        let dir = self.scratch("upload")?;
        let tmp = dir.0.join(name);
        fs::File::create(&tmp)
            .and_then(|f| {
                let mut w = std::io::BufWriter::with_capacity(1 << 16, f);
                write(&mut w)?;
                w.into_inner().map_err(|e| e.into_error()).map(drop)
            })
            .map_err(io(&tmp))?;
        self.send_file(runner, area, &tmp)
    }

    /// Copies a local file into an area by rsync, keeping its mtime (so that the next
    /// transfer of the same file finds it up to date and keeps no generation copy).
    ///
    /// # Errors
    /// rsync failing.
    pub fn send_file(
        &self,
        runner: &dyn Runner,
        area: Area,
        file: &Path,
    ) -> Result<(), TargetError> {
        let cmd = self
            .ep
            .cmd()
            .args(["--mkpath", "--times", "--chmod=F644"])
            .arg(file)
            .arg(self.ep.dest(&self.area(area, "")));
        let (ended, out) = self.ep.run(runner, &cmd)?;
        self.require_ok(ended, &out)
    }

    // ---- large files (raw ZFS streams) -------------------------------------------------

    /// A file to fill and then [`Upload::commit`] as `AREA/NAME`: on a local target a
    /// hidden temporary file next to it, renamed when complete; otherwise a scratch
    /// copy, sent by rsync (which writes under a temporary name and renames too). Until
    /// committed the name does not exist, so a half-written stream is never a restore
    /// point; dropping an uncommitted upload removes what was written.
    ///
    /// # Errors
    /// The temporary file cannot be created.
    pub fn upload(&self, area: Area, name: &str) -> Result<Upload, TargetError> {
        if let Some(root) = self.local() {
            let dir = root.join(area.dir());
            fs::create_dir_all(&dir).map_err(io(&dir))?;
            let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
            let file = fs::File::create(&tmp).map_err(io(&tmp))?;
            return Ok(Upload {
                file: Some(file),
                tmp,
                area,
                local_dest: Some(dir.join(name)),
                _scratch: None,
            });
        }
        let dir = self.scratch("stream")?;
        let tmp = dir.0.join(name);
        let file = fs::File::create(&tmp).map_err(io(&tmp))?;
        Ok(Upload {
            file: Some(file),
            tmp,
            area,
            local_dest: None,
            _scratch: Some(dir),
        })
    }

    /// `AREA/NAME` as a local file to read: itself on a local target, else a scratch
    /// copy fetched by rsync; `None` when it does not exist.
    ///
    /// # Errors
    /// It exists but cannot be fetched.
    pub fn local_copy(
        &self,
        runner: &dyn Runner,
        area: Area,
        name: &str,
    ) -> Result<Option<LocalCopy>, TargetError> {
        if let Some(root) = self.local() {
            let p = root.join(area.dir()).join(name);
            return match fs::symlink_metadata(&p) {
                Ok(m) if m.is_file() => Ok(Some(LocalCopy {
                    path: p,
                    _scratch: None,
                })),
                Ok(_) => Err(TargetError::Io {
                    path: p,
                    err: std::io::Error::other("not a regular file"),
                }),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io(&p)(e)),
            };
        }
        let dir = self.scratch("fetch")?;
        let local = dir.0.join(name);
        let cmd = self
            .ep
            .cmd()
            .arg(self.ep.dest(&self.area(area, name)))
            .arg(&local);
        match self.ep.run(runner, &cmd)? {
            (Ended::Missing, _) => Ok(None),
            (Ended::Ok, _) => Ok(Some(LocalCopy {
                path: local,
                _scratch: Some(dir),
            })),
            (e, out) => self.require_ok(e, &out).map(|()| None),
        }
    }

    /// Reads `AREA/NAME`; `None` when it does not exist.
    ///
    /// # Errors
    /// It exists but cannot be read or fetched.
    pub fn fetch(
        &self,
        runner: &dyn Runner,
        area: Area,
        name: &str,
    ) -> Result<Option<Vec<u8>>, TargetError> {
        if let Some(root) = self.local() {
            let p = root.join(area.dir()).join(name);
            return match fs::read(&p) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io(&p)(e)),
            };
        }
        match self.local_copy(runner, area, name)? {
            Some(c) => fs::read(&c.path).map(Some).map_err(io(&c.path)),
            None => Ok(None),
        }
    }

    /// A command that must have done all it was asked: anything but exit 0 is its
    /// failure, with rsync's own stderr.
    fn require_ok(&self, ended: Ended, out: &crate::exec::Output) -> Result<(), TargetError> {
        match ended {
            Ended::Ok => Ok(()),
            _ => Err(RsyncError::Failed {
                target: self.address.to_string(),
                exit: out.exit,
                stderr: out.stderr_str(),
            }
            .into()),
        }
    }

    /// The entries directly inside an area (a missing area is empty).
    ///
    /// # Errors
    /// The target cannot be read.
    pub fn list(
        &self,
        runner: &dyn Runner,
        area: Area,
    ) -> Result<Vec<rsync::ListEntry>, TargetError> {
        if let Some(root) = self.local() {
            let dir = root.join(area.dir());
            let rd = match fs::read_dir(&dir) {
                Ok(rd) => rd,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(io(&dir)(e)),
            };
            let mut v = Vec::new();
            for e in rd {
                let e = e.map_err(io(&dir))?;
                let ft = e.file_type().map_err(io(&e.path()))?;
                let kind = if ft.is_dir() {
                    b'd'
                } else if ft.is_symlink() {
                    b'l'
                } else {
                    b'-'
                };
                v.push(rsync::ListEntry {
                    name: e.file_name().as_bytes().to_vec(),
                    kind,
                    size: 0,
                });
            }
            return Ok(v);
        }
        let cmd = self
            .ep
            .cmd()
            .arg("--list-only")
            .arg(self.ep.dest(&self.area(area, "")));
        self.listing(runner, &cmd)
    }

    /// Generation directories by stamp, oldest first (only names that are stamps).
    ///
    /// # Errors
    /// The target cannot be read.
    pub fn generations(&self, runner: &dyn Runner) -> Result<Vec<String>, TargetError> {
        let mut names: Vec<String> = self
            .list(runner, Area::Generations)?
            .into_iter()
            .filter(|e| e.kind == b'd')
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .filter(|n| crate::snapshot::valid_stamp(n))
            .collect();
        names.sort();
        Ok(names)
    }

    // ---- the transfer and reading back ------------------------------------------------

    /// Sends the mounted encrypted view to `current/`, with what it replaces or deletes
    /// going to `generations/STAMP/`; stops rsync when the run is cancelled.
    ///
    /// # Errors
    /// rsync failing (other than files vanishing), or cancellation.
    pub fn send_view(
        &self,
        runner: &dyn Runner,
        view: &Path,
        stamp: &str,
        extra: &[String],
        pass: Pass<'_>,
    ) -> Result<Outcome, RsyncError> {
        let cmd = rsync::transfer_cmd(&self.ep, &self.address.backup_dir(stamp), extra, view, pass);
        tracing::info!(cmd = %cmd, "transferring");
        let names = !matches!(pass, Pass::First);
        rsync::transfer(runner, &cmd, self.ep.shown(), names)
    }

    /// A list of paths for rsync's `--files-from --from0`, in this process's scratch
    /// space; removed when dropped.
    pub fn files_from(
        &self,
        paths: impl IntoIterator<Item = impl AsRef<[u8]>>,
    ) -> Result<FilesFrom, TargetError> {
        let dir = self.scratch("list")?;
        let p = dir.0.join("list");
        let mut data = Vec::new();
        for c in paths {
            data.extend_from_slice(c.as_ref());
            data.push(0);
        }
        fs::write(&p, &data).map_err(io(&p))?;
        Ok(FilesFrom { _dir: dir, path: p })
    }

    /// Copies the listed files from `current/`, then from each of `generations` in the
    /// order given, each overwriting, into `dest`; a file missing from one is fine.
    ///
    /// # Errors
    /// rsync failing otherwise.
    pub fn fetch_files(
        &self,
        runner: &dyn Runner,
        list: &FilesFrom,
        generations: &[String],
        dest: &Path,
    ) -> Result<(), TargetError> {
        let sources = std::iter::once(Area::Current.dir().to_string()).chain(
            generations
                .iter()
                .map(|g| format!("{}/{g}", Area::Generations.dir())),
        );
        for src in sources {
            let cmd = self
                .ep
                .cmd()
                .args(["--archive", "--numeric-ids", "--ignore-times", "--from0"])
                .arg(format!("--files-from={}", list.path.display()))
                .arg(self.ep.dest(&format!("{src}/")))
                .arg(format!("{}/", dest.display()));
            self.ep.run(runner, &cmd)?;
        }
        Ok(())
    }

    /// Compares `current/` with the encrypted view at `view` by rsync `--dry-run
    /// --checksum --itemize-changes` (the checksums of the target's files are computed
    /// where they are; nothing is downloaded): rsync's itemized lines.
    ///
    /// # Errors
    /// rsync failing.
    pub fn compare_view(&self, runner: &dyn Runner, view: &Path) -> Result<String, TargetError> {
        let cmd = self
            .ep
            .cmd()
            .args([
                "--dry-run",
                "--recursive",
                "--links",
                "--checksum",
                "--delete",
                "--itemize-changes",
            ])
            .arg(format!("{}/", view.display()))
            .arg(self.ep.dest(&self.area(Area::Current, "")));
        let (ended, out) = self.ep.run(runner, &cmd)?;
        self.require_ok(ended, &out)?;
        Ok(out.stdout_str())
    }

    /// `current/` as a directory on this machine, when the target is one: it can then be
    /// hashed directly instead of compared through rsync.
    pub fn current_here(&self) -> Option<PathBuf> {
        self.local().map(|r| r.join(Area::Current.dir()))
    }

    /// `generations/STAMP` as a directory on this machine, when the target is one.
    pub fn generation_here(&self, stamp: &str) -> Option<PathBuf> {
        self.local()
            .map(|r| r.join(Area::Generations.dir()).join(stamp))
    }

    /// The ciphertext of `current/CPATH` (fetched one file at a time into scratch space,
    /// so no second copy of the backup exists on disk).
    ///
    /// # Errors
    /// The transfer failed; a missing or unreadable file is the inner error.
    pub fn read_current(
        &self,
        runner: &dyn Runner,
        cpath: &[u8],
    ) -> Result<std::io::Result<Vec<u8>>, TargetError> {
        if let Some(cur) = self.current_here() {
            return Ok(fs::read(cur.join(OsStr::from_bytes(cpath))));
        }
        let rel = format!("current/{}", String::from_utf8_lossy(cpath));
        let dir = self.scratch("deep")?;
        let local = dir.0.join("f");
        let cmd = self.ep.cmd().arg(self.ep.dest(&rel)).arg(&local);
        match self.ep.run(runner, &cmd)? {
            (Ended::Missing, _) => Ok(Err(std::io::Error::from(std::io::ErrorKind::NotFound))),
            (ended, out) => {
                self.require_ok(ended, &out)?;
                Ok(fs::read(&local))
            }
        }
    }

    // ---- prune ----------------------------------------------------------------------------

    /// What prune may do here: renames on a local path and over ssh with a shell; whole
    /// deletions only with rsync alone (rrsync, a daemon). For ssh, a harmless `echo` is
    /// tried once; a key restricted to rrsync or another forced command does not answer.
    pub fn mode(&self, runner: &dyn Runner) -> Mode {
        let shell = match &self.address {
            Address::Local(_) => return Mode::Merge,
            Address::RsyncDaemon { .. } | Address::Zfs(_) => return Mode::DeleteOnly,
            Address::Ssh { .. } => *self.shell.get_or_init(|| self.probe_shell(runner)),
        };
        if shell {
            Mode::Merge
        } else {
            Mode::DeleteOnly
        }
    }

    /// The sha1 of every regular file in `current/`, computed on an ssh target that runs
    /// a shell (`find | xargs sha1sum`); `None` for other targets (local ones are read
    /// here, rrsync and daemons have no shell). What a provider's host says it holds:
    /// it catches damage and swapped files, not a host that lies about its own hashes
    /// (`verify --deep` and `restore` hash what they fetch themselves).
    ///
    /// # Errors
    /// The command failing, or output that is not sha1sum's.
    pub fn remote_sums(&self, runner: &dyn Runner) -> Result<Option<Sums>, TargetError> {
        let Address::Ssh { path, .. } = &self.address else {
            return Ok(None);
        };
        if self.mode(runner) != Mode::Merge {
            return Ok(None);
        }
        let dir = format!("{}/{}", path.trim_end_matches('/'), Area::Current.dir());
        let script = format!(
            "cd -- {} && find . -type f -print0 | xargs -0 -r sha1sum -z --",
            String::from_utf8_lossy(&rsync::sh_quote(dir.as_bytes()))
        );
        let cmd = self.ssh_cmd().arg(script);
        let out = cmd.run_checked(runner).map_err(|e| TargetError::Io {
            path: PathBuf::from(self.address.to_string()),
            err: std::io::Error::other(e.to_string()),
        })?;
        let mut sums = std::collections::BTreeMap::new();
        for rec in out.stdout.split(|b| *b == 0).filter(|r| !r.is_empty()) {
            let bad = || TargetError::ListParse {
                target: self.address.to_string(),
                line: String::from_utf8_lossy(rec).into_owned(),
            };
            let (hexsum, rest) = rec.split_at_checked(40).ok_or_else(bad)?;
            let path = rest.strip_prefix(b"  ./").ok_or_else(bad)?;
            let mut sha1 = [0u8; 20];
            hex::decode_to_slice(hexsum, &mut sha1).map_err(|_| bad())?;
            sums.insert(path.to_vec(), sha1);
        }
        Ok(Some(sums))
    }

    fn probe_shell(&self, runner: &dyn Runner) -> bool {
        const MARK: &str = "snapveil-shell-ok";
        let probe = self.ssh_cmd().arg(format!("echo {MARK}"));
        let shell = runner
            .output(&probe)
            .map(|o| o.exit == crate::exec::Exit::Code(0) && o.stdout_str().trim() == MARK)
            .unwrap_or(false);
        if !shell {
            tracing::info!(target = %self.address, "the ssh key runs no shell (rrsync?): prune deletes whole generations, no merges");
        }
        shell
    }

    fn ssh_cmd(&self) -> Cmd {
        let (prog, args) = self
            .ssh
            .split_first()
            .map(|(p, a)| (p.as_str(), a))
            .unwrap_or(("ssh", &[]));
        Cmd::new(prog)
            .args(args)
            .arg(self.address.ssh_dest().unwrap_or_default())
    }

    /// What prune looks at, as paths relative to the root with whether each is a
    /// directory: `runs/*.json`, `manifests/*.{sha1,meta}`, `generations/` whole. The
    /// layout is checked first.
    ///
    /// # Errors
    /// A symlinked area, not a target at all, or the target cannot be read.
    pub fn prune_paths(&self, runner: &dyn Runner) -> Result<Vec<(Vec<u8>, bool)>, TargetError> {
        if let Some(root) = self.local() {
            return ops::local_paths(root);
        }
        let entries = self.root_listing(
            runner,
            &[
                "/runs/*.json",
                "/manifests/*.sha1",
                "/manifests/*.meta",
                "/generations/**",
            ],
        )?;
        let has = |top: &[u8]| entries.iter().any(|e| e.kind == b'd' && e.name == top);
        if !has(b"runs") && !has(b"generations") {
            return Err(TargetError::NotATarget {
                target: self.ep.dest(""),
            });
        }
        Ok(entries
            .into_iter()
            .filter(|e| e.name != b"current")
            .map(|e| (e.name, e.kind == b'd'))
            .collect())
    }

    /// Applies prune's operations the way this target allows ([`Target::mode`]): renames
    /// here, one sh script over ssh, or rsync deletions (only whole deletions exist then;
    /// the plan never asks for more).
    ///
    /// # Errors
    /// The first failing operation; nothing is overwritten.
    pub fn apply(&self, runner: &dyn Runner, ops: &[Op]) -> Result<(), TargetError> {
        if let Some(root) = self.local() {
            return ops::apply_local(root, ops);
        }
        if let (Mode::Merge, Address::Ssh { path, .. }) = (self.mode(runner), &self.address) {
            self.ssh_cmd()
                .args(["sh", "-s"])
                .stdin(ops::shell_script(path, ops))
                .run_checked(runner)
                .map_err(RsyncError::from)?;
            return Ok(());
        }
        self.apply_by_rsync(runner, ops)
    }

    /// Deletion by syncing an empty directory with include filters naming exactly the
    /// entries to delete, `--exclude=*` protecting everything else, and `--delete`.
    fn apply_by_rsync(&self, runner: &dyn Runner, ops: &[Op]) -> Result<(), TargetError> {
        let empty = self.scratch("empty")?;
        let mut src: OsString = empty.0.clone().into_os_string();
        src.push("/");
        let delete = |area: Area, includes: Vec<String>| -> Result<(), TargetError> {
            if includes.is_empty() {
                return Ok(());
            }
            self.ep
                .cmd()
                .args(["-r", "--delete"])
                .args(includes.iter().map(|i| format!("--include={i}")))
                .arg("--exclude=*")
                .arg(&src)
                .arg(self.ep.dest(&self.area(area, "")))
                .run_checked(runner)
                .map_err(RsyncError::from)?;
            Ok(())
        };
        // One record per call, in plan order: the oldest record goes last.
        let mut manifests = Vec::new();
        let mut gens = Vec::new();
        let mut streams = Vec::new();
        for op in ops {
            match op {
                Op::RemoveRecord { stamp } => delete(Area::Runs, vec![format!("/{stamp}.json")])?,
                Op::RemoveManifest { stamp } => {
                    manifests.push(format!("/{stamp}.sha1"));
                    manifests.push(format!("/{stamp}.meta"));
                }
                Op::DeleteGen { stamp } => gens.push(format!("/{stamp}/***")),
                Op::RemoveStream { name } => streams.push(format!("/{}", rsync_literal(name))),
                other => {
                    return Err(TargetError::Io {
                        path: PathBuf::from("generations"),
                        err: std::io::Error::other(format!("rsync-only target cannot {other:?}")),
                    })
                }
            }
        }
        delete(Area::Manifests, manifests)?;
        delete(Area::Generations, gens)?;
        delete(Area::Streams, streams)
    }
}

/// `name` as an rsync filter pattern matching only itself (wildcards escaped).
fn rsync_literal(name: &str) -> String {
    let mut s = String::with_capacity(name.len());
    for c in name.chars() {
        if matches!(c, '*' | '?' | '[' | '\\') {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

/// A `--files-from` list in scratch space.
pub struct FilesFrom {
    _dir: Scratch,
    path: PathBuf,
}

impl FilesFrom {
    pub fn path(&self) -> &Path {
        &self.path
    }
}
