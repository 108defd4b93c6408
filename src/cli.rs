//! Command-line interface: clap derive only, no logic. `lib.rs::run` hands each
//! subcommand's arguments to its `commands::*` module, the only code that reads these
//! types; nothing below `commands` depends on this module.

use crate::logging::LogFormat;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "snapveil", version, about, long_about = LONG_ABOUT)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    /// More log detail (-v debug, -vv trace). SNAPVEIL_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// The name of the hidden packaging subcommand; see [`command`].
pub const GEN_DOCS: &str = "gen-docs";

/// What `main` parses: [`Cli`] plus the hidden `gen-docs DIR` (man pages and completions
/// for the package, `docs::write_all`). It is added here rather than declared in
/// [`Command`] so that `Cli::command()`, the tree the pages and completions are made from,
/// is exactly what users see (completion generators do not skip hidden subcommands).
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command().subcommand(
        clap::Command::new(GEN_DOCS)
            .hide(true)
            .about("Write man pages (DIR/man8) and shell completions (DIR/completions)")
            .arg(
                clap::Arg::new("dir")
                    .value_name("DIR")
                    .required(true)
                    .value_parser(clap::value_parser!(PathBuf)),
            ),
    )
}

/// The DIR of `snapveil gen-docs DIR`, when that is what was asked.
pub fn gen_docs_dir(matches: &clap::ArgMatches) -> Option<PathBuf> {
    match matches.subcommand() {
        Some((GEN_DOCS, m)) => m.get_one::<PathBuf>("dir").cloned(),
        _ => None,
    }
}

const LONG_ABOUT: &str = "\
snapveil takes a temporary snapshot of a dataset (ZFS, btrfs, LVM), presents it through an
encrypting FUSE view byte-compatible with `gocryptfs -reverse`, rsyncs that view to a target
that never sees plaintext, keeps replaced files as dated generations, and releases the
snapshot on every path out.

Backups restore with snapveil or with the stock gocryptfs binary.";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a key config (gocryptfs format) and, if missing, a random passfile.
    Init(InitArgs),
    /// Present SOURCE as a read-only encrypted tree at MOUNTPOINT.
    Mount(MountArgs),
    /// Unmount a view mounted by `snapveil mount`.
    Umount(UmountArgs),
    /// Decrypt a copy of the view (e.g. the backup target) into OUT_DIR, without FUSE.
    Decrypt(DecryptArgs),
    /// Mount a backup copy of the view as a read-only decrypted tree, for browsing.
    Open(OpenArgs),
    /// Run the configured jobs (all when none is named): snapshot, encrypt, rsync.
    Run(RunArgs),
    /// Validate the config without side effects; errors name file, line and field.
    CheckConfig(ConfigArg),
    /// Last run of each job: result, duration, bytes sent, generations.
    Status(ConfigArg),
    /// List the generations and restore points of a job on its target.
    List(ListArgs),
    /// Take a temporary snapshot of a source and print its name and read-only path;
    /// release it at once unless --hold or --wait.
    Snapshot(SnapshotArgs),
    /// Remove the snapshots, clones and mounts a crashed or killed run of a job left behind.
    Cleanup(CleanupArgs),
    /// Delete restore points of a target by a retention policy, merging generations.
    Prune(PruneArgs),
    /// Check the target's current/ against the last run's manifest (--deep: decrypt and
    /// compare with a fresh snapshot's plaintext); exit 1 on any difference.
    Verify(VerifyArgs),
    /// Restore plaintext paths of a job, as of now or of a past run, into a directory.
    Restore(RestoreArgs),
    /// Pull mode's forced command (`command="snapveil serve-pull JOB",restrict` in
    /// authorized_keys): snapshot, then serve the server's `rsync --server --sender`
    /// (SSH_ORIGINAL_COMMAND) from the encrypted view.
    ServePull(ServePullArgs),
    /// Print a systemd .mount unit that mounts the job's encrypted view (type
    /// fuse.snapveil) for a backup server to pull.
    MountUnit(MountUnitArgs),
}

#[derive(Debug, Args)]
pub struct ServePullArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    pub job: String,
}

#[derive(Debug, Args)]
pub struct MountUnitArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    pub job: String,
    /// Where the view is mounted (default /srv/snapveil-pull/JOB).
    #[arg(long = "where", value_name = "DIR")]
    pub mountpoint: Option<PathBuf>,
    /// Present every entry as owned by this UID:GID (the pulling account).
    #[arg(long, value_name = "UID:GID")]
    pub force_owner: Option<String>,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    pub job: String,
    /// Also decrypt the target's files in memory and compare them with a fresh snapshot.
    #[arg(long)]
    pub deep: bool,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    pub job: String,
    /// Plaintext paths relative to the source root (a directory restores its subtree;
    /// `/` the whole source). Raw bytes: any file name can be given.
    #[arg(required_unless_present = "into", value_parser = clap::value_parser!(std::ffi::OsString))]
    pub paths: Vec<std::ffi::OsString>,
    /// Output directory (created; must be empty).
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "into",
        conflicts_with = "into"
    )]
    pub to: Option<PathBuf>,
    /// Raw ZFS jobs: receive the chain up to this restore point (a stamp or the snapshot
    /// name) into a new dataset.
    #[arg(long, value_name = "POOL/DATASET", requires = "snapshot")]
    pub into: Option<String>,
    /// Raw ZFS jobs: the restore point (stamp or snapshot name) for --into.
    #[arg(long, value_name = "NAME", requires = "into")]
    pub snapshot: Option<String>,
    /// Raw ZFS jobs: the age identity file (default: the job's age_identity_file).
    #[arg(long, value_name = "FILE", requires = "into")]
    pub identity: Option<PathBuf>,
    /// Raw ZFS jobs: also use stream records without a MAC (written by a snapveil before
    /// sealed records; their stream files cannot be authenticated).
    #[arg(long, requires = "into")]
    pub accept_unauthenticated: bool,
    /// A run stamp or a time: restore the newest restore point at or before it.
    #[arg(long, value_name = "TIME")]
    pub as_of: Option<String>,
    /// Write the encrypted files (with derived gocryptfs.diriv files and gocryptfs.conf)
    /// instead of decrypting, for stock gocryptfs.
    #[arg(long)]
    pub raw: bool,
}

/// `snapveil prune [JOB]... [--dry-run]` by the config's policies, or
/// `snapveil prune --target T --keep-…` for any target (restic's `forget` semantics).
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Jobs of the config to prune (default: all), each by its retention policy.
    #[arg(value_name = "JOB", conflicts_with = "target")]
    pub jobs: Vec<String>,
    #[command(flatten)]
    pub config: ConfigArg,
    /// Instead of the config: a target, a local path, `[user@]host:path` (ssh) or
    /// `rsync://host[:port]/module/path`, with --keep-* rules.
    #[arg(long, value_name = "TARGET")]
    pub target: Option<String>,
    /// Only print what would be deleted and merged.
    #[arg(long)]
    pub dry_run: bool,
    /// The ssh key may only run `rsync --server` (rrsync): no merges, whole deletions.
    #[arg(long)]
    pub rsync_only: bool,
    /// ssh command line for ssh targets.
    #[arg(long, value_name = "CMD", default_value = "ssh")]
    pub ssh: String,
    /// rsync program.
    #[arg(long, value_name = "PATH", default_value = "rsync")]
    pub rsync: String,
    /// Count hours, days, weeks… in UTC instead of the local time zone.
    #[arg(long)]
    pub utc: bool,
    #[command(flatten)]
    pub keep: KeepArgs,
}

/// Retention rules: counts (-1 = unlimited) and durations like 14d, 2w, 1y2m3d, 36h.
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Retention")]
pub struct KeepArgs {
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true,
        requires = "target"
    )]
    pub keep_last: i64,
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true,
        requires = "target"
    )]
    pub keep_hourly: i64,
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true,
        requires = "target"
    )]
    pub keep_daily: i64,
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true,
        requires = "target"
    )]
    pub keep_weekly: i64,
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true,
        requires = "target"
    )]
    pub keep_monthly: i64,
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true,
        requires = "target"
    )]
    pub keep_yearly: i64,
    #[arg(long, value_name = "DURATION", requires = "target")]
    pub keep_within: Option<String>,
    #[arg(long, value_name = "DURATION", requires = "target")]
    pub keep_within_hourly: Option<String>,
    #[arg(long, value_name = "DURATION", requires = "target")]
    pub keep_within_daily: Option<String>,
    #[arg(long, value_name = "DURATION", requires = "target")]
    pub keep_within_weekly: Option<String>,
    #[arg(long, value_name = "DURATION", requires = "target")]
    pub keep_within_monthly: Option<String>,
    #[arg(long, value_name = "DURATION", requires = "target")]
    pub keep_within_yearly: Option<String>,
}

/// The key material of a view: a gocryptfs config and the passfile that unlocks it.
#[derive(Debug, Args, Clone)]
pub struct KeyArgs {
    /// Key config in gocryptfs format (mode 0600 or stricter).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// File whose first line is the password (mode 0600 or stricter).
    #[arg(long, value_name = "FILE")]
    pub passfile: PathBuf,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub key: KeyArgs,
    /// Do not encrypt file names (gocryptfs -plaintextnames).
    #[arg(long, conflicts_with = "deterministic_names")]
    pub plaintext_names: bool,
    /// Encrypt names without per-directory IVs (gocryptfs -deterministic-names).
    #[arg(long)]
    pub deterministic_names: bool,
    /// log2 of scrypt's N, like gocryptfs -scryptn.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(10..=28))]
    pub scrypt_n: u8,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    #[command(flatten)]
    pub key: KeyArgs,
    /// gitignore-style pattern on plaintext paths to hide from the view (repeatable).
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Vec<String>,
    /// Return once the mount answers, leaving a daemon serving it.
    #[arg(long)]
    pub background: bool,
    /// Present every entry as owned by UID:GID (so an unprivileged account can pull).
    #[arg(long, value_name = "UID:GID")]
    pub force_owner: Option<String>,
    /// Let other users than the mounting one see the view (root only).
    #[arg(long)]
    pub allow_other: bool,
    /// The filesystem name shown in mount and df (default: snapveil).
    #[arg(long, value_name = "NAME")]
    pub fsname: Option<String>,
    /// SOURCE does not change while mounted (a snapshot): the kernel may cache names,
    /// attributes, listings and contents for the life of the mount (much faster on many
    /// small files). Without it, changes show within a second.
    #[arg(long)]
    pub frozen: bool,
    pub source: PathBuf,
    pub mountpoint: PathBuf,
}

#[derive(Debug, Args)]
pub struct UmountArgs {
    pub mountpoint: PathBuf,
}

#[derive(Debug, Args)]
pub struct DecryptArgs {
    /// Key config; defaults to ENCRYPTED_TREE/gocryptfs.conf.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub passfile: PathBuf,
    pub encrypted_tree: PathBuf,
    pub out_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct OpenArgs {
    /// Key config; defaults to TARGET_DIR/gocryptfs.conf.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub passfile: PathBuf,
    /// Return once the mount answers, leaving a daemon serving it.
    #[arg(long)]
    pub background: bool,
    /// The encrypted copy (e.g. TARGET/current, or an sshfs mount of it).
    pub target_dir: PathBuf,
    pub mountpoint: PathBuf,
}

/// Which source to snapshot for which job, and how.
#[derive(Debug, Args)]
pub struct SnapshotSourceArgs {
    /// What to snapshot: zfs:POOL/DATASET, btrfs:/SUBVOLUME, lvm:VG/LV or dir:/PATH.
    #[arg(long, value_name = "SPEC")]
    pub source: crate::snapshot::Source,
    /// Job name; snapshots are named snapveil-JOB-STAMP.
    #[arg(long, value_name = "NAME")]
    pub job: String,
    /// State directory; clones and snapshot LVs are mounted under STATE_DIR/work/JOB.
    #[arg(long, value_name = "DIR", default_value = crate::config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// btrfs: directory for snapshots, on the subvolume's filesystem
    /// (default: .snapveil beside the subvolume).
    #[arg(long, value_name = "DIR")]
    pub snapshot_dir: Option<PathBuf>,
    /// ZFS: snapshot the child datasets too and show them beneath the root.
    #[arg(long)]
    pub recursive: bool,
    /// LVM: copy-on-write space, a percentage of the origin ("10%", the default) or a
    /// size ("2G").
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// LVM: extra mount option for the snapshot (repeatable).
    #[arg(long = "mount-option", value_name = "OPT")]
    pub mount_options: Vec<String>,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub target: SnapshotSourceArgs,
    /// Keep the snapshot for inspection; the next run or `snapveil cleanup` removes it.
    #[arg(long, conflicts_with = "wait")]
    pub hold: bool,
    /// Keep the snapshot until SIGINT/SIGTERM (Ctrl-C), then release it.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// Jobs of the config whose leftovers to remove (default: all). Ignored with --source.
    #[arg(value_name = "JOB")]
    pub jobs: Vec<String>,
    #[command(flatten)]
    pub config: ConfigArg,
    /// Instead of the config: one source (zfs:, btrfs:, lvm:, dir:) and --job NAME.
    #[arg(long, value_name = "SPEC", requires = "job")]
    pub source: Option<crate::snapshot::Source>,
    /// Job name, with --source.
    #[arg(long, value_name = "NAME", requires = "source")]
    pub job: Option<String>,
    /// State directory, with --source.
    #[arg(long, value_name = "DIR", default_value = crate::config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// btrfs, with --source: directory for snapshots (default: .snapveil beside the subvolume).
    #[arg(long, value_name = "DIR")]
    pub snapshot_dir: Option<PathBuf>,
    /// ZFS, with --source: the snapshots were recursive.
    #[arg(long)]
    pub recursive: bool,
}

/// The job config file.
#[derive(Debug, Args, Clone)]
pub struct ConfigArg {
    /// Job config (TOML).
    #[arg(long = "config", value_name = "FILE", env = "SNAPVEIL_CONFIG", default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Jobs to run (default: all, in config order).
    pub jobs: Vec<String>,
    /// Back up into a target whose newest restore point is older than what this machine
    /// last wrote there (rolled back, or its newest points deleted).
    #[arg(long)]
    pub accept_rollback: bool,
    /// Back up into a target with records missing that prune did not remove, records
    /// that do not link up, or records whose MAC fails (tampered).
    #[arg(long)]
    pub accept_truncation: bool,
    /// rsync the whole view, not only what changed since the last run (file jobs; a
    /// full pass also runs by itself every `full_every`, default 7 days).
    #[arg(long)]
    pub full: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    pub job: String,
}
