//! The job config (`/etc/snapveil/snapveil.toml`): the raw serde document (`raw.rs`), and
//! the validated, typed [`Config`] the runner uses (`validate.rs`). Every error names the
//! file, the line and the field, because the person reading it is at 2 a.m. with an editor.
//!
//! Owns: parsing and validation without side effects. Does not own: what a job does.

mod raw;
mod validate;

pub use validate::{load, load_str, parse_duration};

use crate::snapshot::{SnapshotOptions, Source, Tools as SnapshotTools};
use crate::target::Address;
use std::path::PathBuf;
use std::time::Duration;

pub const DEFAULT_PATH: &str = "/etc/snapveil/snapveil.toml";

/// Default state directory (`state_dir`); work dirs are `STATE_DIR/work/<job>`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/snapveil";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    /// One or more problems, each already formatted as `FILE:LINE: FIELD: reason`.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

/// What a job does with its source: `file` (the encrypted view, rsync'ed) or `zfs-raw`
/// (`zfs send` streams, raw or age-encrypted: [`crate::zfs_send`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    File,
    ZfsRaw,
}

/// restic `forget`-style policy as written in the config; the retention module plans with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub last: Option<i64>,
    pub hourly: Option<i64>,
    pub daily: Option<i64>,
    pub weekly: Option<i64>,
    pub monthly: Option<i64>,
    pub yearly: Option<i64>,
    pub within: Option<String>,
    pub within_hourly: Option<String>,
    pub within_daily: Option<String>,
    pub within_weekly: Option<String>,
    pub within_monthly: Option<String>,
    pub within_yearly: Option<String>,
    /// Prune after a successful run.
    pub prune: bool,
}

impl RetentionPolicy {
    /// The planner's policy, or `None` when no rule is set at all: then every restore
    /// point is kept and nothing is ever pruned.
    ///
    /// # Errors
    /// A bad duration, or a policy that keeps nothing.
    pub fn policy(
        &self,
    ) -> Result<Option<crate::retention::Policy>, crate::retention::PolicyError> {
        if self.is_empty() {
            return Ok(None);
        }
        crate::retention::Policy::from_parts(
            [
                self.last.unwrap_or(0),
                self.hourly.unwrap_or(0),
                self.daily.unwrap_or(0),
                self.weekly.unwrap_or(0),
                self.monthly.unwrap_or(0),
                self.yearly.unwrap_or(0),
            ],
            [
                self.within.as_deref(),
                self.within_hourly.as_deref(),
                self.within_daily.as_deref(),
                self.within_weekly.as_deref(),
                self.within_monthly.as_deref(),
                self.within_yearly.as_deref(),
            ],
        )
        .map(Some)
    }

    pub fn is_empty(&self) -> bool {
        [
            self.last,
            self.hourly,
            self.daily,
            self.weekly,
            self.monthly,
            self.yearly,
        ]
        .iter()
        .all(Option::is_none)
            && [
                &self.within,
                &self.within_hourly,
                &self.within_daily,
                &self.within_weekly,
                &self.within_monthly,
                &self.within_yearly,
            ]
            .iter()
            .all(|w| w.is_none())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    PreSnapshot,
    PostSnapshot,
    PostBackup,
    OnFailure,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::PreSnapshot => "pre_snapshot",
            Phase::PostSnapshot => "post_snapshot",
            Phase::PostBackup => "post_backup",
            Phase::OnFailure => "on_failure",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub phase: Phase,
    /// argv; a config string becomes `["sh", "-c", string]`.
    pub argv: Vec<String>,
    pub held: bool,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    pub mode: Mode,
    pub source: Source,
    pub target: Address,
    /// The gocryptfs key config and its passfile, required for every job: file jobs
    /// encrypt with it; raw ZFS jobs derive from its master key only the key that seals
    /// their stream records (issue 14), never a content or name key.
    pub key_config: PathBuf,
    pub passfile: PathBuf,
    /// Raw ZFS mode's settings; `Some` exactly for `mode = "zfs-raw"`.
    pub raw: Option<RawOptions>,
    pub excludes: Vec<String>,
    pub rsync_args: Vec<String>,
    pub ssh_args: Vec<String>,
    pub snapshot: SnapshotOptions,
    pub retention: RetentionPolicy,
    pub hooks: Vec<Hook>,
    pub verify_every: u32,
    /// File mode: a run rsyncs the whole view when its last full pass is this old;
    /// between, only what changed ([`crate::changes`]). Default 7 days.
    pub full_every: Duration,
}

/// How a raw ZFS job encrypts what ZFS does not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawOptions {
    /// age X25519 recipients; the host then cannot read its own backups.
    pub age_recipients: Vec<String>,
    /// An age passphrase file (scrypt), instead of recipients.
    pub age_passphrase_file: Option<PathBuf>,
    /// The identity restore and `verify --deep` decrypt with (recipients only).
    pub age_identity_file: Option<PathBuf>,
    pub wrap_raw: bool,
    pub send_intermediates: bool,
    /// A run sends a full stream when the newest full of the chain is at least this old,
    /// so that old chains can be deleted whole; `None`: one chain for ever (only the first
    /// run, or a lost base, starts a new one).
    pub full_every: Option<Duration>,
    /// `zfs://` targets: `zfs receive -F`, which rolls the target back to the base and
    /// destroys what it holds past it. Off: a target changed since the last receive
    /// fails the run instead.
    pub force: bool,
}

impl RawOptions {
    /// Whether snapveil can encrypt a stream itself.
    pub fn has_age(&self) -> bool {
        !self.age_recipients.is_empty() || self.age_passphrase_file.is_some()
    }
}

#[derive(Debug, Clone)]
pub struct Tools {
    pub rsync: PathBuf,
    pub ssh: PathBuf,
    pub snapshot: SnapshotTools,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub state_dir: PathBuf,
    pub tools: Tools,
    pub jobs: Vec<Job>,
    /// Problems that do not stop a run (e.g. a `dir:` source, which is not a snapshot).
    pub warnings: Vec<String>,
}

impl Config {
    pub fn job(&self, name: &str) -> Option<&Job> {
        self.jobs.iter().find(|j| j.name == name)
    }

    /// The jobs named on a command line, in that order, or all of them when none is.
    ///
    /// # Errors
    /// The first name that is not a job of this config.
    pub fn select<'a>(&'a self, names: &'a [String]) -> Result<Vec<&'a Job>, &'a str> {
        if names.is_empty() {
            return Ok(self.jobs.iter().collect());
        }
        names
            .iter()
            .map(|n| self.job(n).ok_or(n.as_str()))
            .collect()
    }
}
