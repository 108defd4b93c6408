//! LVM provider: `lvcreate --snapshot --size SIZE --name snapveil-JOB-STAMP VG/LV`, then the
//! snapshot LV is mounted read-only under the work dir (`nouuid` for XFS, whose duplicate
//! UUID would otherwise be refused; `noload` for ext3/ext4, so the journal is not replayed
//! onto the snapshot), and on release unmounted and `lvremove -f`'d.
//!
//! A classic (non-thin) snapshot has fixed copy-on-write space; when writes to the origin
//! fill it, LVM invalidates the snapshot and reads from it return errors or garbage. That
//! is checked through `lvs` before the tree is handed out, by [`super::SnapshotGuard::verify`]
//! after the transfer, and on release, and reported as [`SnapshotError::LvmInvalidated`]
//! instead of passing a half-broken tree off as a backup.
//!
//! This kernel has no device-mapper, so the command sequence is verified by recorded
//! `ScriptedRunner` tests (tests/snapshot.rs), not against real LVs.

use super::{
    io_err, parse_err, parse_name, FirstError, ParseError, SnapshotError, SnapshotOptions, Tools,
};
use crate::exec::{Cmd, CommandError, Runner};
use std::path::{Path, PathBuf};

/// Default copy-on-write space: 10% of the origin.
pub const DEFAULT_SIZE: &str = "10%";

/// The `lvs -o` columns this module reads, in this order.
pub const LVS_FIELDS: &str = "lv_name,vg_name,lv_attr,lv_size,origin,snap_percent";

#[derive(Debug)]
pub(crate) struct Held {
    vg: String,
    lv: String,
    name: String,
    device: String,
    mountpoint: Option<PathBuf>,
}

/// One row of `lvs --noheadings --nosuffix --units b --separator '|' -o LVS_FIELDS`.
#[derive(Clone, Debug, PartialEq)]
pub struct LvRow {
    pub lv_name: String,
    pub vg_name: String,
    pub attr: String,
    /// Bytes.
    pub size: u64,
    pub origin: Option<String>,
    /// Percent of the copy-on-write space used (snapshots only).
    pub snap_percent: Option<f64>,
}

impl LvRow {
    /// A snapshot (lv_attr type `s`, or `S` merging).
    pub fn is_snapshot(&self) -> bool {
        self.attr.starts_with(['s', 'S'])
    }

    /// Invalidated: lv_attr state `I` (invalid) or `S` (invalid suspended), or the
    /// copy-on-write space is full.
    pub fn is_invalid(&self) -> bool {
        matches!(self.attr.chars().nth(4), Some('I' | 'S'))
            || self.snap_percent.is_some_and(|p| p >= 100.0)
    }
}

/// Parses `lvs` rows in [`LVS_FIELDS`] order, `|`-separated, indented, sizes in bytes.
///
/// # Errors
/// A row with the wrong number of fields or an unreadable size or percentage.
pub fn parse_lvs(out: &[u8]) -> Result<Vec<LvRow>, ParseError> {
    let text = String::from_utf8_lossy(out);
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split('|').map(str::trim).collect();
            let [name, vg, attr, size, origin, pct] = f.as_slice() else {
                return Err(ParseError(format!(
                    "expected 6 |-separated fields ({LVS_FIELDS}), got {line:?}"
                )));
            };
            let size = size.parse::<u64>().map_err(|_| {
                ParseError(format!("lv_size {size:?} is not a byte count in {line:?}"))
            })?;
            let snap_percent = if pct.is_empty() {
                None
            } else {
                Some(pct.parse::<f64>().map_err(|_| {
                    ParseError(format!("snap_percent {pct:?} is not a number in {line:?}"))
                })?)
            };
            Ok(LvRow {
                lv_name: (*name).to_owned(),
                vg_name: (*vg).to_owned(),
                attr: (*attr).to_owned(),
                size,
                origin: (!origin.is_empty()).then(|| (*origin).to_owned()),
                snap_percent,
            })
        })
        .collect()
}

/// The `--size` argument for a snapshot of an origin of `origin_bytes`: a percentage
/// ("10%", "2.5%") is computed from the origin and rounded up to whole 512-byte sectors
/// (`NNNb`); an absolute size ("2G", "512m", "1073741824b") is passed through.
///
/// # Errors
/// A reason string for anything else (the caller names the origin).
pub fn resolve_size(size: &str, origin_bytes: u64) -> Result<String, String> {
    if let Some(p) = size.strip_suffix('%') {
        let pct: f64 = p
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v > 0.0 && *v <= 100.0)
            .ok_or("a percentage must be a number in (0, 100]")?;
        let bytes = (origin_bytes as f64 * pct / 100.0).ceil() as u64;
        let bytes = bytes.div_ceil(512).max(1) * 512;
        return Ok(format!("{bytes}b"));
    }
    let digits = size.trim_end_matches(|c: char| "bBsSkKmMgGtTpPeE".contains(c));
    let unit_len = size.len() - digits.len();
    let num_ok = !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && digits.matches('.').count() <= 1
        && digits.parse::<f64>().is_ok_and(|v| v > 0.0);
    if num_ok && unit_len <= 1 {
        Ok(size.to_owned())
    } else {
        Err("expected a percentage of the origin (\"10%\") or a size such as \"2G\"".into())
    }
}

fn lvs(tools: &Tools, target: &str) -> Cmd {
    Cmd::new(&tools.lvs)
        .args([
            "--noheadings",
            "--nosuffix",
            "--units",
            "b",
            "--separator",
            "|",
            "-o",
        ])
        .args([LVS_FIELDS, target])
}

fn not_found(e: &CommandError) -> bool {
    let s = e.stderr();
    s.contains("Failed to find logical volume")
        || (s.contains("Volume group") && s.contains("not found"))
}

fn lvm_err(vg: &str, lv: &str, action: &'static str) -> impl FnOnce(CommandError) -> SnapshotError {
    let (vg, lv) = (vg.to_owned(), lv.to_owned());
    move |source| SnapshotError::Lvm {
        vg,
        lv,
        action,
        source,
    }
}

/// The row of `VG/LV`, `None` when it does not exist.
fn lv_row(
    runner: &dyn Runner,
    tools: &Tools,
    vg: &str,
    lv: &str,
) -> Result<Option<LvRow>, SnapshotError> {
    let cmd = lvs(tools, &format!("{vg}/{lv}"));
    let out = match cmd.run_checked(runner) {
        Ok(o) => o,
        Err(e) if not_found(&e) => {
            return Err(SnapshotError::LvmOriginNotFound {
                vg: vg.to_owned(),
                lv: lv.to_owned(),
                source: Some(e),
            })
        }
        Err(e) => return Err(lvm_err(vg, lv, "lvs")(e)),
    };
    let rows = parse_lvs(&out.stdout).map_err(parse_err(&cmd))?;
    Ok(rows
        .into_iter()
        .find(|r| r.lv_name == lv && r.vg_name == vg))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn take(
    runner: &dyn Runner,
    tools: &Tools,
    vg: &str,
    lv: &str,
    name: &str,
    opts: &SnapshotOptions,
    work_dir: &Path,
) -> Result<(PathBuf, Held), SnapshotError> {
    let origin =
        lv_row(runner, tools, vg, lv)?.ok_or_else(|| SnapshotError::LvmOriginNotFound {
            vg: vg.to_owned(),
            lv: lv.to_owned(),
            source: None,
        })?;
    let wanted = opts.size.as_deref().unwrap_or(DEFAULT_SIZE);
    let size = resolve_size(wanted, origin.size).map_err(|reason| SnapshotError::InvalidSize {
        size: wanted.to_owned(),
        origin: format!("{vg}/{lv}"),
        reason,
    })?;
    Cmd::new(&tools.lvcreate)
        .args([
            "--snapshot",
            "--size",
            &size,
            "--name",
            name,
            &format!("{vg}/{lv}"),
        ])
        .run_checked(runner)
        .map_err(|e| {
            if e.stderr()
                .to_ascii_lowercase()
                .contains("insufficient free space")
            {
                SnapshotError::LvmVgFull {
                    vg: vg.to_owned(),
                    lv: lv.to_owned(),
                    size: size.clone(),
                    source: e,
                }
            } else if not_found(&e) {
                SnapshotError::LvmOriginNotFound {
                    vg: vg.to_owned(),
                    lv: lv.to_owned(),
                    source: Some(e),
                }
            } else {
                lvm_err(vg, lv, "lvcreate --snapshot")(e)
            }
        })?;
    let mut held = Held {
        vg: vg.to_owned(),
        lv: lv.to_owned(),
        name: name.to_owned(),
        device: format!("/dev/{vg}/{name}"),
        mountpoint: None,
    };
    match mount_and_check(runner, tools, &mut held, opts, work_dir) {
        Ok(p) => Ok((p, held)),
        Err(e) => {
            // Already failing: the validity check on release would only repeat it.
            if let Err(e2) = release(runner, tools, held, false) {
                tracing::error!(
                    "cleanup after a failed snapshot: {}",
                    super::error_chain(&e2)
                );
            }
            Err(e)
        }
    }
}

fn mount_and_check(
    runner: &dyn Runner,
    tools: &Tools,
    held: &mut Held,
    opts: &SnapshotOptions,
    work_dir: &Path,
) -> Result<PathBuf, SnapshotError> {
    let out = Cmd::new(&tools.blkid)
        .args(["-o", "value", "-s", "TYPE", &held.device])
        .run_checked(runner)
        .map_err(lvm_err(&held.vg, &held.name, "blkid"))?;
    let fstype = out.stdout_str().trim().to_owned();
    if fstype.is_empty() {
        return Err(SnapshotError::UnknownFilesystem {
            device: held.device.clone(),
        });
    }
    let mut options = vec!["ro".to_owned()];
    match fstype.as_str() {
        "xfs" => options.push("nouuid".into()),
        "ext3" | "ext4" => options.push("noload".into()),
        _ => {}
    }
    options.extend(opts.mount_options.iter().cloned());
    let mountpoint = work_dir.join(&held.name);
    std::fs::create_dir_all(&mountpoint).map_err(io_err(&mountpoint))?;
    Cmd::new(&tools.mount)
        .args(["-t", &fstype, "-o", &options.join(","), &held.device])
        .arg(&mountpoint)
        .run_checked(runner)
        .map_err(|e| {
            let _ = std::fs::remove_dir(&mountpoint);
            SnapshotError::Mount {
                device: held.device.clone(),
                mountpoint: mountpoint.clone(),
                source: e,
            }
        })?;
    held.mountpoint = Some(mountpoint.clone());
    verify(runner, tools, held)?;
    Ok(mountpoint)
}

/// Checks the snapshot LV through `lvs`.
pub(crate) fn verify(runner: &dyn Runner, tools: &Tools, h: &Held) -> Result<(), SnapshotError> {
    match lv_row(runner, tools, &h.vg, &h.name)? {
        Some(r) if r.is_invalid() => Err(SnapshotError::LvmInvalidated {
            vg: h.vg.clone(),
            lv: h.lv.clone(),
            name: h.name.clone(),
            attr: r.attr,
            percent: r
                .snap_percent
                .map_or_else(|| "?".into(), |p| format!("{p:.2}")),
        }),
        Some(_) => Ok(()),
        None => Err(SnapshotError::LvmOriginNotFound {
            vg: h.vg.clone(),
            lv: h.name.clone(),
            source: None,
        }),
    }
}

fn umount(runner: &dyn Runner, tools: &Tools, mountpoint: &Path) -> Result<(), SnapshotError> {
    let cmd = Cmd::new(&tools.umount).arg(mountpoint);
    match super::run_retrying_busy(runner, &cmd, &["target is busy"]) {
        Ok(_) => {}
        Err(e) if e.stderr().contains("not mounted") => {
            tracing::warn!(mountpoint = %mountpoint.display(), "already unmounted");
        }
        Err(e) => {
            return Err(SnapshotError::Umount {
                mountpoint: mountpoint.to_owned(),
                source: e,
            })
        }
    }
    let _ = std::fs::remove_dir(mountpoint);
    Ok(())
}

fn lvremove(runner: &dyn Runner, tools: &Tools, vg: &str, name: &str) -> Result<(), SnapshotError> {
    // "in use": udev may still be probing the just-unmounted LV.
    let cmd = Cmd::new(&tools.lvremove).args(["-f", &format!("{vg}/{name}")]);
    match super::run_retrying_busy(runner, &cmd, &["in use", "busy"]) {
        Ok(_) => Ok(()),
        Err(e) if not_found(&e) => {
            tracing::warn!(lv = %format!("{vg}/{name}"), "snapshot LV already gone");
            Ok(())
        }
        Err(e) => Err(lvm_err(vg, name, "lvremove")(e)),
    }
}

/// Unmounts and removes the snapshot LV. With `check`, first reads its state, so that an
/// overflowed snapshot is reported ([`SnapshotError::LvmInvalidated`]) even though it is
/// removed all the same.
pub(crate) fn release(
    runner: &dyn Runner,
    tools: &Tools,
    h: Held,
    check: bool,
) -> Result<(), SnapshotError> {
    let mut first = FirstError::default();
    if check {
        first.note(verify(runner, tools, &h));
    }
    let mut unmounted = true;
    if let Some(mp) = &h.mountpoint {
        let r = umount(runner, tools, mp);
        unmounted = r.is_ok();
        first.note(r);
    }
    // lvremove -f of a mounted LV fails anyway; skipping it keeps the error clear.
    if unmounted {
        first.note(lvremove(runner, tools, &h.vg, &h.name));
    }
    first.into_result()
}

pub(crate) fn cleanup_stale(
    runner: &dyn Runner,
    tools: &Tools,
    job: &str,
    vg: &str,
    lv: &str,
    work_dir: &Path,
) -> Result<Vec<String>, SnapshotError> {
    let cmd = lvs(tools, vg);
    let out = cmd.run_checked(runner).map_err(lvm_err(vg, lv, "lvs"))?;
    let rows = parse_lvs(&out.stdout).map_err(parse_err(&cmd))?;
    let mut removed = Vec::new();
    let mut first = FirstError::default();
    for r in rows {
        let ours = r.vg_name == vg
            && r.is_snapshot()
            && r.origin.as_deref() == Some(lv)
            && parse_name(job, &r.lv_name).is_some();
        if !ours {
            continue;
        }
        let mp = work_dir.join(&r.lv_name);
        if mp.is_dir() {
            if let Err(e) = umount(runner, tools, &mp) {
                first.note(Err(e));
                continue;
            }
        }
        let res = lvremove(runner, tools, vg, &r.lv_name);
        if res.is_ok() {
            removed.push(format!("{vg}/{}", r.lv_name));
        }
        first.note(res);
    }
    first.into_result().map(|()| removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    // `lvs --noheadings --nosuffix --units b --separator '|' -o LVS_FIELDS vg0`, in the
    // format of lvm2 2.03 (Debian 12): indented rows, empty fields for non-snapshots.
    // Hand-written (no device-mapper here to record from).
    const LVS: &str = include_str!("../../tests/fixtures/outputs/lvs-vg0.txt");

    #[test]
    fn parses_lvs_rows() {
        let rows = parse_lvs(LVS.as_bytes()).unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].lv_name, "root");
        assert_eq!(rows[0].size, 10_737_418_240);
        assert_eq!(rows[0].origin, None);
        assert!(!rows[0].is_snapshot());
        let ok = &rows[1];
        assert!(ok.is_snapshot() && !ok.is_invalid());
        assert_eq!(ok.origin.as_deref(), Some("root"));
        assert_eq!(ok.snap_percent, Some(3.12));
        let bad = &rows[2];
        assert!(bad.is_snapshot() && bad.is_invalid(), "{bad:?}");
        assert!(parse_lvs(b"  root|vg0|-wi-ao----|10G||\n").is_err());
        assert!(parse_lvs(b"  root|vg0\n").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(resolve_size("10%", 10_737_418_240).unwrap(), "1073741824b");
        // Rounded up to whole sectors.
        assert_eq!(resolve_size("10%", 1000).unwrap(), "512b");
        assert_eq!(resolve_size("2.5%", 1_000_000).unwrap(), "25088b");
        assert_eq!(resolve_size("2G", 1).unwrap(), "2G");
        assert_eq!(resolve_size("512", 1).unwrap(), "512");
        assert_eq!(resolve_size("1.5t", 1).unwrap(), "1.5t");
        for bad in ["0%", "101%", "x%", "", "G", "2GB", "-1G", "1..2G", "10 %"] {
            assert!(resolve_size(bad, 1 << 30).is_err(), "{bad}");
        }
    }
}
