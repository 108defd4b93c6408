//! RawConfig → Config. Collects every problem instead of stopping at the first, each as
//! `FILE:LINE: FIELD: reason`.

use super::raw::{RawCommand, RawConfig, RawJob, RawRetention};
use super::{Config, ConfigError, Hook, Job, Mode, Phase, RetentionPolicy, Tools};
use crate::snapshot::{Source, Tools as SnapshotTools};
use crate::target::Address;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// Line number (1-based) of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<String>,
    warnings: Vec<String>,
}

impl Ctx<'_> {
    fn err(&mut self, span: std::ops::Range<usize>, field: &str, reason: impl std::fmt::Display) {
        self.errors.push(format!(
            "{}:{}: {field}: {reason}",
            self.file.display(),
            line_of(self.text, span.start)
        ));
    }
    fn warn(&mut self, span: std::ops::Range<usize>, field: &str, reason: impl std::fmt::Display) {
        self.warnings.push(format!(
            "{}:{}: {field}: {reason}",
            self.file.display(),
            line_of(self.text, span.start)
        ));
    }
}

/// Durations like `90s`, `10m`, `2h`, `14d`, `2w`, `1y`, and sums such as `1d12h`.
/// Months and years count 30 and 365 days; retention windows use them loosely anyway.
///
/// # Errors
/// An empty string, a missing unit or an unknown unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = 0u64;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num
            .parse()
            .map_err(|_| format!("{s:?}: a number must come before {c:?}"))?;
        num.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'w' => 7 * 86400,
            'M' => 30 * 86400,
            'y' => 365 * 86400,
            _ => {
                return Err(format!(
                    "{s:?}: unknown unit {c:?} (use s, m, h, d, w, M, y)"
                ))
            }
        };
        total += n * unit;
    }
    if !num.is_empty() {
        return Err(format!(
            "{s:?}: missing unit after {num} (e.g. {num}s, {num}m, {num}d)"
        ));
    }
    Ok(Duration::from_secs(total))
}

/// Loads and validates a config file.
///
/// # Errors
/// Unreadable file, TOML syntax, unknown keys, or invalid values, all with file and line.
pub fn load(file: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        file: file.into(),
        source,
    })?;
    load_str(file, &text)
}

/// # Errors
/// As [`load`].
pub fn load_str(file: &Path, text: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
        ConfigError::Invalid(vec![format!(
            "{}:{line}: {}",
            file.display(),
            e.message().trim()
        )])
    })?;
    let mut cx = Ctx {
        file,
        text,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let cfg = validate(&mut cx, raw);
    if cx.errors.is_empty() {
        let mut cfg = cfg;
        cfg.warnings = cx.warnings;
        Ok(cfg)
    } else {
        Err(ConfigError::Invalid(cx.errors))
    }
}

fn abs_path(cx: &mut Ctx, v: &Spanned<String>, field: &str) -> PathBuf {
    let p = PathBuf::from(v.get_ref());
    if !p.is_absolute() {
        cx.err(
            v.span(),
            field,
            format!("{:?} must be an absolute path", v.get_ref()),
        );
    }
    p
}

fn duration(cx: &mut Ctx, v: &Option<Spanned<String>>, field: &str, default: Duration) -> Duration {
    match v {
        None => default,
        Some(s) => match parse_duration(s.get_ref()) {
            Ok(d) if d.is_zero() => {
                cx.err(s.span(), field, "must be longer than zero");
                default
            }
            Ok(d) => d,
            Err(e) => {
                cx.err(s.span(), field, e);
                default
            }
        },
    }
}

/// `/abs/path`, `[user@]host:path`, `rsync://host[:port]/module/path`.
fn retention(
    cx: &mut Ctx,
    base: &RetentionPolicy,
    raw: &Option<Spanned<RawRetention>>,
    field: &str,
) -> RetentionPolicy {
    let Some(r) = raw else { return base.clone() };
    let span = r.span();
    let r = r.get_ref();
    let mut p = base.clone();
    let counts = [
        ("last", &r.last, &mut p.last),
        ("hourly", &r.hourly, &mut p.hourly),
        ("daily", &r.daily, &mut p.daily),
        ("weekly", &r.weekly, &mut p.weekly),
        ("monthly", &r.monthly, &mut p.monthly),
        ("yearly", &r.yearly, &mut p.yearly),
    ];
    let mut errs = Vec::new();
    for (name, v, slot) in counts {
        if let Some(v) = v {
            if *v.get_ref() < -1 {
                errs.push((
                    v.span(),
                    format!("{field}.{name}"),
                    "must be -1 (unlimited) or a count >= 0".to_string(),
                ));
            }
            *slot = Some(*v.get_ref());
        }
    }
    let windows = [
        ("within", &r.within, &mut p.within),
        ("within_hourly", &r.within_hourly, &mut p.within_hourly),
        ("within_daily", &r.within_daily, &mut p.within_daily),
        ("within_weekly", &r.within_weekly, &mut p.within_weekly),
        ("within_monthly", &r.within_monthly, &mut p.within_monthly),
        ("within_yearly", &r.within_yearly, &mut p.within_yearly),
    ];
    for (name, v, slot) in windows {
        if let Some(v) = v {
            // Calendar spans as restic's --keep-within (m = months), not hook timeouts.
            if let Err(e) = v.get_ref().parse::<crate::retention::Span>() {
                errs.push((v.span(), format!("{field}.{name}"), e.to_string()));
            }
            *slot = Some(v.get_ref().clone());
        }
    }
    if let Some(b) = r.prune {
        p.prune = b;
    }
    for (s, f, e) in errs {
        cx.err(s, &f, e);
    }
    let keeps_something = p.is_empty()
        || [p.last, p.hourly, p.daily, p.weekly, p.monthly, p.yearly]
            .iter()
            .any(|c| c.is_some_and(|n| n != 0))
        || p.within.is_some()
        || p.within_hourly.is_some()
        || p.within_daily.is_some()
        || p.within_weekly.is_some()
        || p.within_monthly.is_some()
        || p.within_yearly.is_some();
    if !keeps_something {
        cx.err(span, field, "this policy keeps nothing (every count is 0); pruning would delete every restore point but the newest");
    }
    p
}

fn validate(cx: &mut Ctx, raw: RawConfig) -> Config {
    let state_dir = raw
        .state_dir
        .as_ref()
        .map(|s| abs_path(cx, s, "state_dir"))
        .unwrap_or_else(|| PathBuf::from(super::DEFAULT_STATE_DIR));
    let hook_timeout = duration(
        cx,
        &raw.hook_timeout,
        "hook_timeout",
        Duration::from_secs(600),
    );
    let default_retention = retention(
        cx,
        &RetentionPolicy {
            prune: true,
            ..Default::default()
        },
        &raw.retention,
        "retention",
    );
    let default_target = raw
        .target
        .as_ref()
        .map(|t| (t.clone(), Address::parse(t.get_ref())));
    if let Some((t, Err(e))) = &default_target {
        cx.err(t.span(), "target", e);
    }
    let st = SnapshotTools::default();
    let rt = &raw.tools;
    let pb = |o: &Option<String>, d: &Path| {
        o.as_ref()
            .map(PathBuf::from)
            .unwrap_or_else(|| d.to_path_buf())
    };
    let tools = Tools {
        rsync: pb(&rt.rsync, Path::new("rsync")),
        ssh: pb(&rt.ssh, Path::new("ssh")),
        snapshot: SnapshotTools {
            zfs: pb(&rt.zfs, &st.zfs),
            btrfs: pb(&rt.btrfs, &st.btrfs),
            lvcreate: pb(&rt.lvcreate, &st.lvcreate),
            lvremove: pb(&rt.lvremove, &st.lvremove),
            lvs: pb(&rt.lvs, &st.lvs),
            blkid: pb(&rt.blkid, &st.blkid),
            mount: pb(&rt.mount, &st.mount),
            umount: pb(&rt.umount, &st.umount),
        },
    };
    let mut names = HashSet::new();
    let mut jobs = Vec::new();
    for (i, j) in raw.job.iter().enumerate() {
        let f = format!("job[{i}]");
        if let Some(job) = validate_job(
            cx,
            j.get_ref(),
            &f,
            hook_timeout,
            &default_retention,
            default_target.as_ref(),
            raw.verify_every.unwrap_or(0),
        ) {
            if !names.insert(job.name.clone()) {
                cx.err(
                    j.get_ref().name.span(),
                    &format!("{f}.name"),
                    format!("duplicate job name {:?}", job.name),
                );
            }
            jobs.push(job);
        }
    }
    if raw.job.is_empty() {
        cx.warnings
            .push(format!("{}: no [[job]] defined", cx.file.display()));
    }
    Config {
        file: cx.file.to_path_buf(),
        state_dir,
        tools,
        jobs,
        warnings: Vec::new(),
    }
}

/// A file job's `full_every` by default: a target changed behind snapveil's back is
/// mended by a full pass within a week.
pub const FILE_FULL_EVERY: Duration = Duration::from_secs(7 * 86400);

fn validate_job(
    cx: &mut Ctx,
    j: &RawJob,
    f: &str,
    hook_timeout: Duration,
    default_retention: &RetentionPolicy,
    default_target: Option<&(Spanned<String>, Result<Address, String>)>,
    verify_every: u32,
) -> Option<Job> {
    let name = j.name.get_ref().clone();
    if crate::snapshot::validate_job(&name).is_err() {
        cx.err(
            j.name.span(),
            &format!("{f}.name"),
            format!("{name:?}: use letters, digits, '_', '.', '-' (not starting with '.' or '-')"),
        );
    }
    let mode = match j.mode.as_ref().map(|m| m.get_ref().as_str()) {
        None | Some("file") => Mode::File,
        Some("zfs-raw") => Mode::ZfsRaw,
        Some(other) => {
            cx.err(
                j.mode.as_ref().expect("some").span(),
                &format!("{f}.mode"),
                format!("{other:?}: expected \"file\" or \"zfs-raw\""),
            );
            Mode::File
        }
    };
    let source: Option<Source> = match j.source.get_ref().parse::<Source>() {
        Ok(s) => {
            if matches!(s, Source::Dir { .. }) {
                cx.warn(j.source.span(), &format!("{f}.source"), "dir: takes no snapshot; the backup reads the live tree and may be inconsistent");
            }
            if mode == Mode::ZfsRaw && !matches!(s, Source::Zfs { .. }) {
                cx.err(
                    j.source.span(),
                    &format!("{f}.source"),
                    "mode zfs-raw needs a zfs: source",
                );
            }
            Some(s)
        }
        Err(e) => {
            cx.err(j.source.span(), &format!("{f}.source"), e);
            None
        }
    };
    let target = match (&j.target, default_target) {
        (Some(t), _) => match Address::parse(t.get_ref()) {
            Ok(t) => Some(t),
            Err(e) => {
                cx.err(t.span(), &format!("{f}.target"), e);
                None
            }
        },
        (None, Some((_, Ok(base)))) => Some(match base {
            Address::Local(p) => Address::Local(p.join(&name)),
            Address::Ssh { user, host, path } => Address::Ssh {
                user: user.clone(),
                host: host.clone(),
                path: format!("{}/{name}", path.trim_end_matches('/')),
            },
            Address::RsyncDaemon {
                host,
                port,
                module,
                path,
            } => Address::RsyncDaemon {
                host: host.clone(),
                port: *port,
                module: module.clone(),
                path: if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}/{name}")
                },
            },
            Address::Zfs(z) => Address::Zfs(z.child(&name)),
        }),
        (None, Some((_, Err(_)))) => None,
        (None, None) => {
            cx.err(
                j.name.span(),
                &format!("{f}.target"),
                "missing (and no top-level default target)",
            );
            None
        }
    };
    let mut keys = Vec::new();
    for (field, v) in [("key_config", &j.key_config), ("passfile", &j.passfile)] {
        match v {
            Some(v) => keys.push((field, v, abs_path(cx, v, &format!("{f}.{field}")))),
            None if mode == Mode::File => cx.err(
                j.name.span(),
                &format!("{f}.{field}"),
                "missing (file mode encrypts with the gocryptfs key config)",
            ),
            // A zfs:// target holds no records: the receiving pool is the replica.
            None if matches!(target, Some(Address::Zfs(_))) => {}
            None => cx.err(
                j.name.span(),
                &format!("{f}.{field}"),
                "missing (raw ZFS mode authenticates its stream records with a key \
                 derived from this key config's master key: make one with snapveil init)",
            ),
        }
    }
    let raw = (mode == Mode::ZfsRaw).then(|| raw_options(cx, j, f));
    let target_span = j.target.as_ref().map_or(j.name.span(), |t| t.span());
    match (&target, &raw) {
        (Some(Address::Zfs(_)), None) => cx.err(
            target_span,
            &format!("{f}.target"),
            format!(
                "job {name:?}: a zfs:// target receives zfs streams: only mode = \"zfs-raw\" jobs can use it"
            ),
        ),
        (Some(Address::Zfs(_)), Some(o)) => {
            let age = [
                ("wrap_raw", o.wrap_raw),
                ("age_recipients", !o.age_recipients.is_empty()),
                ("age_passphrase_file", o.age_passphrase_file.is_some()),
            ];
            for (field, set) in age {
                if set {
                    cx.err(
                        target_span.clone(),
                        &format!("{f}.{field}"),
                        "a zfs:// target gets zfs streams for zfs receive, never age files: use a directory target for age",
                    );
                }
            }
        }
        (_, _) => {
            if let Some(v) = &j.force {
                cx.err(v.span(), &format!("{f}.force"), "only for a raw ZFS job with a zfs:// target");
            }
        }
    }
    let key_config = keys
        .iter()
        .find(|k| k.0 == "key_config")
        .map(|k| k.2.clone())
        .unwrap_or_default();
    let passfile = keys
        .iter()
        .find(|k| k.0 == "passfile")
        .map(|k| k.2.clone())
        .unwrap_or_default();
    for (field, s, path) in keys.iter().map(|(f, s, p)| (*f, *s, p)) {
        if !path.is_absolute() {
            continue;
        }
        match crate::crypto::config::check_private(path) {
            Ok(()) => {}
            Err(crate::crypto::ConfigError::Read { source, .. }) => cx.err(
                s.span(),
                &format!("{f}.{field}"),
                format!("{}: {source}", path.display()),
            ),
            Err(e) => cx.err(s.span(), &format!("{f}.{field}"), e),
        }
    }
    if let Some(kc) = j.key_config.as_ref() {
        if key_config.is_absolute() && key_config.exists() {
            if let Err(e) = crate::crypto::KeyConfig::load(&key_config) {
                if !matches!(e, crate::crypto::ConfigError::TooOpen { .. }) {
                    cx.err(kc.span(), &format!("{f}.key_config"), e);
                }
            }
        }
    }
    let mut gb = ignore::gitignore::GitignoreBuilder::new("/");
    for p in &j.excludes {
        if let Err(e) = gb.add_line(None, p) {
            cx.err(
                j.name.span(),
                &format!("{f}.excludes"),
                format!("{p:?}: {e}"),
            );
        }
    }
    for a in &j.rsync_args {
        // Options that would change where or how generations are kept are ours.
        let forbidden = [
            "--delete",
            "--backup",
            "--backup-dir",
            "--suffix",
            "--link-dest",
            "--remove-source-files",
            "--dry-run",
            "-n",
            "--inplace",
        ];
        let opt = a.get_ref().split('=').next().unwrap_or("");
        if forbidden.contains(&opt) || !a.get_ref().starts_with('-') {
            cx.err(a.span(), &format!("{f}.rsync_args"), format!("{:?} is not allowed here (snapveil manages deletion, backups and paths itself)", a.get_ref()));
        }
    }
    let job_timeout = duration(
        cx,
        &j.hook_timeout,
        &format!("{f}.hook_timeout"),
        hook_timeout,
    );
    let mut hooks = Vec::new();
    for (k, h) in j.hooks.iter().enumerate() {
        let hf = format!("{f}.hooks[{k}]");
        let h = h.get_ref();
        let phase = match h.phase.get_ref().as_str() {
            "pre_snapshot" => Phase::PreSnapshot,
            "post_snapshot" => Phase::PostSnapshot,
            "post_backup" => Phase::PostBackup,
            "on_failure" => Phase::OnFailure,
            other => {
                cx.err(h.phase.span(), &format!("{hf}.phase"), format!("{other:?}: expected pre_snapshot, post_snapshot, post_backup or on_failure"));
                continue;
            }
        };
        if h.held && phase != Phase::PreSnapshot {
            cx.err(
                h.phase.span(),
                &format!("{hf}.held"),
                "only pre_snapshot hooks can be held",
            );
        }
        let argv = match h.command.get_ref() {
            RawCommand::Shell(s) if !s.trim().is_empty() => {
                vec!["sh".into(), "-c".into(), s.clone()]
            }
            RawCommand::Argv(v) if !v.is_empty() && !v[0].is_empty() => v.clone(),
            _ => {
                cx.err(h.command.span(), &format!("{hf}.command"), "empty command");
                continue;
            }
        };
        if argv[0].starts_with('/') {
            use std::os::unix::fs::PermissionsExt;
            match std::fs::metadata(&argv[0]) {
                Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
                Ok(_) => cx.err(
                    h.command.span(),
                    &format!("{hf}.command"),
                    format!("{} is not an executable file", argv[0]),
                ),
                Err(e) => cx.err(
                    h.command.span(),
                    &format!("{hf}.command"),
                    format!("{}: {e}", argv[0]),
                ),
            }
        }
        let timeout = duration(cx, &h.timeout, &format!("{hf}.timeout"), job_timeout);
        hooks.push(Hook {
            phase,
            argv,
            held: h.held,
            timeout,
        });
    }
    let retention = retention(
        cx,
        default_retention,
        &j.retention,
        &format!("{f}.retention"),
    );
    Some(Job {
        name,
        mode,
        source: source?,
        target: target?,
        key_config,
        passfile,
        raw,
        excludes: j.excludes.clone(),
        rsync_args: j.rsync_args.iter().map(|a| a.get_ref().clone()).collect(),
        ssh_args: j.ssh_args.clone(),
        snapshot: j
            .snapshot
            .as_ref()
            .map(|s| s.get_ref().clone())
            .unwrap_or_default(),
        retention,
        hooks,
        verify_every: j.verify_every.unwrap_or(verify_every),
        full_every: if mode == Mode::File {
            duration(
                cx,
                &j.full_every,
                &format!("{f}.full_every"),
                FILE_FULL_EVERY,
            )
        } else {
            FILE_FULL_EVERY
        },
    })
}

/// A raw ZFS job's age settings: recipients that parse, private key files, and not both
/// recipients and a passphrase (age cannot mix them in one file).
fn raw_options(cx: &mut Ctx, j: &RawJob, f: &str) -> crate::config::RawOptions {
    use std::str::FromStr;
    let mut o = crate::config::RawOptions {
        wrap_raw: j.wrap_raw.unwrap_or(false),
        send_intermediates: j.send_intermediates.unwrap_or(false),
        force: j.force.as_ref().is_some_and(|v| *v.get_ref()),
        ..Default::default()
    };
    if j.full_every.is_some() {
        o.full_every = Some(duration(
            cx,
            &j.full_every,
            &format!("{f}.full_every"),
            Duration::ZERO,
        ))
        .filter(|d| !d.is_zero());
    }
    for r in &j.age_recipients {
        match age::x25519::Recipient::from_str(r.get_ref()) {
            Ok(_) => o.age_recipients.push(r.get_ref().clone()),
            Err(e) => cx.err(
                r.span(),
                &format!("{f}.age_recipients"),
                format!(
                    "{:?} is not an age X25519 recipient (age1...): {e}",
                    r.get_ref()
                ),
            ),
        }
    }
    let mut private = |v: &Option<Spanned<String>>, field: &str| -> Option<PathBuf> {
        let v = v.as_ref()?;
        let p = abs_path(cx, v, &format!("{f}.{field}"));
        if p.is_absolute() {
            if let Err(e) = crate::crypto::config::check_private(&p) {
                cx.err(v.span(), &format!("{f}.{field}"), e);
            }
        }
        Some(p)
    };
    o.age_passphrase_file = private(&j.age_passphrase_file, "age_passphrase_file");
    o.age_identity_file = private(&j.age_identity_file, "age_identity_file");
    if !o.age_recipients.is_empty() && o.age_passphrase_file.is_some() {
        cx.err(
            j.name.span(),
            &format!("{f}.age_passphrase_file"),
            "age cannot encrypt to recipients and a passphrase at once: choose one",
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_duration("1d12h").unwrap(),
            Duration::from_secs(36 * 3600)
        );
        assert_eq!(
            parse_duration("2w").unwrap(),
            Duration::from_secs(14 * 86400)
        );
        assert!(parse_duration("10").unwrap_err().contains("missing unit"));
        assert!(parse_duration("3x").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn targets() {
        assert_eq!(
            Address::parse("/srv/b").unwrap(),
            Address::Local("/srv/b".into())
        );
        assert_eq!(
            Address::parse("bk@host:/srv/b").unwrap(),
            Address::Ssh {
                user: Some("bk".into()),
                host: "host".into(),
                path: "/srv/b".into()
            }
        );
        assert_eq!(
            Address::parse("rsync://h:8730/mod/a/b").unwrap(),
            Address::RsyncDaemon {
                host: "h".into(),
                port: Some(8730),
                module: "mod".into(),
                path: "a/b".into()
            }
        );
        assert_eq!(
            Address::parse("rsync://h/mod")
                .unwrap()
                .rsync_dest("current"),
            "rsync://h/mod/current"
        );
        assert!(Address::parse("relative/path").is_err());
        assert!(Address::parse("/a/../b").is_err());
    }

    #[test]
    fn full_every_is_a_duration_named_on_error() {
        let dir = tempfile::tempdir().unwrap();
        crate::crypto::config::write_test_key(dir.path());
        let job = |v: &str| {
            format!(
                "[[job]]\nname = \"r\"\nmode = \"zfs-raw\"\nsource = \"zfs:tank/r\"\ntarget = \"/t\"\n\
                 key_config = \"{0}/k.conf\"\npassfile = \"{0}/k.pass\"\n\
                 age_recipients = [\"age1u7c89nqrvl89cfxgusma2sr3g4c7ht6mm668repr76q2xha4e3fs9acrfa\"]\n{v}",
                dir.path().display()
            )
        };
        let c = load_str(Path::new("/etc/s.toml"), &job("full_every = \"30d\"\n")).unwrap();
        assert_eq!(
            c.jobs[0].raw.as_ref().unwrap().full_every,
            Some(Duration::from_secs(30 * 86400))
        );
        let c = load_str(Path::new("/etc/s.toml"), &job("")).unwrap();
        assert_eq!(c.jobs[0].raw.as_ref().unwrap().full_every, None);
        for bad in ["soon", "0s"] {
            let e = load_str(
                Path::new("/etc/s.toml"),
                &job(&format!("full_every = \"{bad}\"\n")),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("/etc/s.toml:9: job[0].full_every"), "{e}");
        }
    }

    #[test]
    fn a_file_job_full_every_defaults_to_a_week() {
        let dir = tempfile::tempdir().unwrap();
        crate::crypto::config::write_test_key(dir.path());
        let job = |v: &str| {
            format!(
                "[[job]]\nname = \"f\"\nsource = \"dir:{0}\"\ntarget = \"/t\"\n\
                 key_config = \"{0}/k.conf\"\npassfile = \"{0}/k.pass\"\n{v}",
                dir.path().display()
            )
        };
        let c = load_str(Path::new("/etc/s.toml"), &job("")).unwrap();
        assert_eq!(c.jobs[0].full_every, FILE_FULL_EVERY);
        let c = load_str(Path::new("/etc/s.toml"), &job("full_every = \"3d\"\n")).unwrap();
        assert_eq!(c.jobs[0].full_every, Duration::from_secs(3 * 86400));
        let e = load_str(Path::new("/etc/s.toml"), &job("full_every = \"0s\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/s.toml:7: job[0].full_every"), "{e}");
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let text = "state_dir = \"/var/lib/x\"\n\n[[job]]\nname = \"a\"\nsource = \"nfs:/x\"\ntarget = \"/t\"\nkey_config = \"/nonexistent/k\"\npassfile = \"/nonexistent/p\"\n";
        let e = load_str(Path::new("/etc/s.toml"), text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/s.toml:5: job[0].source"), "{e}");
        assert!(e.contains("/etc/s.toml:7: job[0].key_config"), "{e}");
        let e = load_str(Path::new("/etc/s.toml"), "bogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/s.toml:1:") && e.contains("bogus"), "{e}");
    }
}
