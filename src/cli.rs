//! Command-line interface: clap derive only, no logic. Each subcommand's work lives in
//! the module that owns it; `lib.rs::run` dispatches.

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
