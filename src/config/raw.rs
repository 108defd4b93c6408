//! The TOML document as written: serde types with spans for the fields validated later,
//! and `deny_unknown_fields` everywhere, so a typo is an error and not a silent default.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub state_dir: Option<Spanned<String>>,
    pub target: Option<Spanned<String>>,
    pub hook_timeout: Option<Spanned<String>>,
    pub verify_every: Option<u32>,
    pub retention: Option<Spanned<RawRetention>>,
    #[serde(default)]
    pub tools: RawTools,
    #[serde(default)]
    pub job: Vec<Spanned<RawJob>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTools {
    pub rsync: Option<String>,
    pub ssh: Option<String>,
    pub zfs: Option<String>,
    pub btrfs: Option<String>,
    pub lvcreate: Option<String>,
    pub lvremove: Option<String>,
    pub lvs: Option<String>,
    pub blkid: Option<String>,
    pub mount: Option<String>,
    pub umount: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetention {
    pub last: Option<Spanned<i64>>,
    pub hourly: Option<Spanned<i64>>,
    pub daily: Option<Spanned<i64>>,
    pub weekly: Option<Spanned<i64>>,
    pub monthly: Option<Spanned<i64>>,
    pub yearly: Option<Spanned<i64>>,
    pub within: Option<Spanned<String>>,
    pub within_hourly: Option<Spanned<String>>,
    pub within_daily: Option<Spanned<String>>,
    pub within_weekly: Option<Spanned<String>>,
    pub within_monthly: Option<Spanned<String>>,
    pub within_yearly: Option<Spanned<String>>,
    pub prune: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJob {
    pub name: Spanned<String>,
    pub mode: Option<Spanned<String>>,
    pub source: Spanned<String>,
    pub target: Option<Spanned<String>>,
    /// Required in file mode; raw ZFS mode encrypts with ZFS or age instead.
    pub key_config: Option<Spanned<String>>,
    pub passfile: Option<Spanned<String>>,
    /// Raw ZFS mode: age X25519 recipients (`age1...`) for streams snapveil encrypts.
    #[serde(default)]
    pub age_recipients: Vec<Spanned<String>>,
    /// Raw ZFS mode: a file (0600) holding an age passphrase, instead of recipients.
    pub age_passphrase_file: Option<Spanned<String>>,
    /// Raw ZFS mode: the age identity file (0600) that restore and `verify --deep` use.
    pub age_identity_file: Option<Spanned<String>>,
    /// Raw ZFS mode: also wrap natively encrypted (raw) streams in age.
    pub wrap_raw: Option<bool>,
    /// Raw ZFS mode: send intermediate snapshots too (`zfs send -I`).
    pub send_intermediates: Option<bool>,
    /// Raw ZFS mode: a new full stream when the chain's full is this old (`30d`). File mode:
    /// rsync over the whole view when the last full pass is this old (default `7d`).
    pub full_every: Option<Spanned<String>>,
    /// Raw ZFS mode, `zfs://` target: `zfs receive -F` (roll the target back).
    pub force: Option<Spanned<bool>>,
    #[serde(default)]
    pub excludes: Vec<String>,
    #[serde(default)]
    pub rsync_args: Vec<Spanned<String>>,
    #[serde(default)]
    pub ssh_args: Vec<String>,
    pub hook_timeout: Option<Spanned<String>>,
    pub verify_every: Option<u32>,
    pub snapshot: Option<Spanned<crate::snapshot::SnapshotOptions>>,
    pub retention: Option<Spanned<RawRetention>>,
    #[serde(default)]
    pub hooks: Vec<Spanned<RawHook>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawCommand {
    Shell(String),
    Argv(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHook {
    pub phase: Spanned<String>,
    pub command: Spanned<RawCommand>,
    #[serde(default)]
    pub held: bool,
    pub timeout: Option<Spanned<String>>,
}
