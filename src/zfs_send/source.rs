//! The source side of a raw job after a successful send: bookmark and hold the sent
//! snapshot, release the hold on the one it supersedes, and destroy this job's older
//! snapshots by the job's retention policy; and, before a send, what the dataset tree's
//! encryption allows (children that are their own encryption roots, keys not loaded,
//! plain and encrypted datasets mixed).
//!
//! The newest sent snapshot is the next increment's base. Its bookmark keeps increments
//! possible after anyone destroys it; the user hold `snapveil-JOB` (`zfs hold`) keeps
//! other tools' retention from destroying it in the first place. Only the newest carries
//! our hold: the hold of the one before is released here, so a hold of ours never keeps
//! a snapshot the policy lets go. Failures here are warnings: the backup is complete.

use super::{zfs, ZfsSendError};
use crate::config::{Job, RawOptions};
use crate::exec::{Cmd, CommandError, Runner};
use crate::snapshot::Tools;

/// The user-hold tag of a job.
pub fn hold_tag(job: &str) -> String {
    format!("snapveil-{job}")
}

fn run_warn(runner: &dyn Runner, cmd: &Cmd, why: &str) -> bool {
    match runner.output(cmd) {
        Ok(o) if o.exit.success() => true,
        Ok(o) => {
            tracing::warn!(
                "{cmd}: {}{why}",
                o.stderr_str().lines().next().unwrap_or("").trim()
            );
            false
        }
        Err(e) => {
            tracing::warn!("{cmd}: {e}{why}");
            false
        }
    }
}

/// After a successful send of `DATASET@SNAP`: bookmark and hold it, release our hold on
/// older snapshots, destroy this job's older snapshots the policy does not keep (without
/// a policy: all of them) and this job's older bookmarks. Snapshots of this job whose
/// stamp is not among `on_target` (the target's restore points before this run: what a killed
/// run left unsent) are nobody's restore point and go whatever the policy. Never touches
/// snapshots that are not this job's.
pub fn after_send(
    runner: &dyn Runner,
    tools: &Tools,
    job: &Job,
    dataset: &str,
    snap: &str,
    recursive: bool,
    on_target: &[String],
) {
    let sent = format!("{dataset}@{snap}");
    let tag = hold_tag(&job.name);
    let r = |c: Cmd| if recursive { c.arg("-r") } else { c };
    run_warn(
        runner,
        &zfs(tools).args(["bookmark", &sent, &format!("{dataset}#{snap}")]),
        " (without a bookmark the next increment needs the snapshot itself, which is kept)",
    );
    run_warn(
        runner,
        &r(zfs(tools).arg("hold")).args([&tag, &sent]),
        " (without a hold, only this job keeps the next increment's base)",
    );
    let list = zfs(tools).args([
        "list", "-H", "-o", "name", "-t", "snapshot", "-d", "1", dataset,
    ]);
    let out = match list.run_checked(runner) {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!("{e}");
            return;
        }
    };
    let prefix = format!("{dataset}@");
    let ours: Vec<(String, String)> = out
        .stdout_str()
        .lines()
        .filter_map(|name| {
            let s = name.strip_prefix(&prefix)?;
            let stamp = crate::snapshot::parse_name(&job.name, s)?;
            (s != snap).then(|| (name.to_string(), stamp.to_string()))
        })
        .collect();
    // Our holds on the older ones go first: a held snapshot cannot be destroyed, and a
    // hold of ours must not outlive its use as a base.
    if !ours.is_empty() {
        let holds = zfs(tools)
            .args(["holds", "-H"])
            .args(ours.iter().map(|(n, _)| n.as_str()));
        match holds.run_checked(runner) {
            Ok(o) => {
                // `NAME<TAB>TAG<TAB>TIME`; zfs-fuse separates with spaces even with -H.
                for line in o.stdout_str().lines() {
                    let Some((name, rest)) = ours
                        .iter()
                        .find_map(|(n, _)| Some((n, line.strip_prefix(n.as_str())?)))
                    else {
                        continue;
                    };
                    let t = rest.split_whitespace().next();
                    {
                        if t == Some(tag.as_str()) {
                            let rel = r(zfs(tools).arg("release")).args([&tag, name]);
                            if run_warn(runner, &rel, "") {
                                tracing::info!("released {tag} on {name}: superseded by {sent}");
                            }
                        }
                    }
                }
            }
            Err(e) => {
                // zfs-fuse and old releases have `zfs hold` but no `zfs holds -H`: try
                // the release on each; "no such tag" is the answer for most.
                tracing::debug!("{e}: releasing {tag} on each older snapshot of this job");
                for (name, _) in &ours {
                    let rel = r(zfs(tools).arg("release")).args([&tag, name]);
                    if runner.output(&rel).is_ok_and(|o| o.exit.success()) {
                        tracing::info!("released {tag} on {name}: superseded by {sent}");
                    }
                }
            }
        }
    }
    let (ours_sent, unsent): (Vec<_>, Vec<_>) = ours
        .iter()
        .cloned()
        .partition(|(_, st)| on_target.contains(st));
    let keep = kept_by_policy(job, &ours_sent, snap);
    for (name, _) in &unsent {
        let d = r(zfs(tools).arg("destroy")).arg(name);
        if run_warn(runner, &d, "") {
            tracing::info!("destroyed {name}: never sent (left by an interrupted run)");
        }
    }
    let ours = ours_sent;
    for (name, stamp) in &ours {
        if let Some(why) = keep.get(stamp) {
            tracing::info!("kept {name} on the source ({why})");
            continue;
        }
        let d = r(zfs(tools).arg("destroy")).arg(name);
        if run_warn(runner, &d, "") {
            tracing::info!("destroyed {name}, sent earlier");
        }
    }
    // Older bookmarks of ours: the sent one is the only base the next run can use.
    let bms = zfs(tools).args([
        "list", "-H", "-o", "name", "-t", "bookmark", "-d", "1", dataset,
    ]);
    if let Ok(o) = runner.output(&bms) {
        if o.exit.success() {
            let bprefix = format!("{dataset}#");
            for name in o.stdout_str().lines() {
                let Some(b) = name.strip_prefix(&bprefix) else {
                    continue;
                };
                if b != snap && crate::snapshot::parse_name(&job.name, b).is_some() {
                    run_warn(runner, &zfs(tools).args(["destroy", name]), "");
                }
            }
        }
    }
}

/// Stamp → why, for this job's older source snapshots that the policy keeps (the sent
/// one, the newest, is always kept and not in `ours`).
fn kept_by_policy(
    job: &Job,
    ours: &[(String, String)],
    sent: &str,
) -> std::collections::BTreeMap<String, String> {
    use crate::retention::{self, RestorePoint};
    let mut keep = std::collections::BTreeMap::new();
    let policy = match job.retention.policy() {
        Ok(Some(p)) => p,
        Ok(None) => return keep,
        Err(e) => {
            tracing::warn!("retention: {e}: keeping every snapshot of this job on the source");
            for (_, s) in ours {
                keep.insert(s.clone(), "the policy does not parse".to_string());
            }
            return keep;
        }
    };
    let points: Vec<RestorePoint> = ours
        .iter()
        .filter_map(|(_, s)| {
            retention::parse_stamp(s).map(|time| RestorePoint {
                stamp: s.clone(),
                time,
            })
        })
        .collect();
    // The sent snapshot counts as the newest point (the policy's counts include it).
    let sent = crate::snapshot::parse_name(&job.name, sent).unwrap_or_default();
    let mut all = points;
    if let Some(time) = retention::parse_stamp(sent) {
        all.push(RestorePoint {
            stamp: sent.to_string(),
            time,
        });
    }
    for d in retention::plan(&all, &policy, &retention::system_local) {
        if d.keep && d.stamp != sent {
            let r: Vec<String> = d.reasons.iter().map(ToString::to_string).collect();
            keep.insert(d.stamp, format!("retention: {}", r.join(", ")));
        }
    }
    keep
}

/// One dataset of the tree a job sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// `None`: not natively encrypted.
    pub encryption: Option<String>,
    pub keystatus: String,
    pub encryption_root: String,
}

/// Parses `zfs get -H -p -r -o name,property,value encryption,keystatus,encryptionroot`.
fn parse_tree(text: &str) -> Vec<Member> {
    let mut v: Vec<Member> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let [name, prop, value] = f[..] else { continue };
        let i = match v.iter().position(|m| m.name == name) {
            Some(i) => i,
            None => {
                v.push(Member {
                    name: name.to_string(),
                    encryption: None,
                    keystatus: "-".into(),
                    encryption_root: "-".into(),
                });
                v.len() - 1
            }
        };
        let m = &mut v[i];
        match prop {
            "encryption" if value != "off" && value != "-" => {
                m.encryption = Some(value.to_string())
            }
            "keystatus" => m.keystatus = value.to_string(),
            "encryptionroot" => m.encryption_root = value.to_string(),
            _ => {}
        }
    }
    v
}

/// For a recursive job: every dataset of the tree's encryption, checked and reported
/// before anything is sent, and how the tree's one `zfs send -R` stream is protected.
///
/// * All natively encrypted: raw (`-w`), whatever their encryption roots and whether
///   their keys are loaded (a raw send needs no key); children that are their own
///   encryption root are reported, since each needs its own key to be unlocked after a
///   restore.
/// * All plain: age.
/// * Mixed: `zfs send -w -R` sends the encrypted ones raw and the plain ones as they are,
///   so the stream is wrapped in age, and without age keys the job is refused, naming
///   the plain datasets.
///
/// # Errors
/// `zfs get` failed, or a mixed tree without age keys.
pub fn tree_protection(
    runner: &dyn Runner,
    tools: &Tools,
    opts: &RawOptions,
    dataset: &str,
) -> Result<super::Protection, ZfsSendError> {
    let cmd = zfs(tools).args([
        "get",
        "-H",
        "-p",
        "-r",
        "-t",
        "filesystem,volume",
        "-o",
        "name,property,value",
        "encryption,keystatus,encryptionroot",
        dataset,
    ]);
    let out = runner
        .output(&cmd)
        .map_err(|e| CommandError::spawn(&cmd, e))?;
    if !out.exit.success() {
        if out.stderr_str().contains("invalid property") {
            return super::protection(None, opts, dataset);
        }
        return Err(CommandError::failed(&cmd, &out).into());
    }
    let tree = parse_tree(&out.stdout_str());
    let (enc, plain): (Vec<&Member>, Vec<&Member>) =
        tree.iter().partition(|m| m.encryption.is_some());
    for m in &enc {
        if m.name != dataset && m.encryption_root == m.name {
            tracing::info!(
                child = %m.name,
                keystatus = %m.keystatus,
                "a child that is its own encryption root: sent raw with the tree; after a restore it is unlocked with its own key"
            );
        }
        if m.keystatus != "available" {
            tracing::info!(
                dataset = %m.name,
                keystatus = %m.keystatus,
                "key not loaded: sent raw all the same (a raw send needs no key)"
            );
        }
    }
    match (enc.is_empty(), plain.is_empty()) {
        (true, _) => super::protection(None, opts, dataset),
        (false, true) => Ok(super::Protection {
            raw: true,
            age: opts.wrap_raw,
        }),
        (false, false) if opts.has_age() => {
            tracing::info!(
                plain = %plain.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", "),
                "a tree of plain and natively encrypted datasets: sent raw (-w) and wrapped in age"
            );
            Ok(super::Protection {
                raw: true,
                age: true,
            })
        }
        (false, false) => Err(ZfsSendError::MixedTree {
            dataset: dataset.to_string(),
            plain: plain.iter().map(|m| m.name.clone()).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::{scripted::ScriptedRunner, Output};

    fn job(policy: &str) -> Job {
        let dir = tempfile::tempdir().unwrap();
        crate::crypto::config::write_test_key(dir.path());
        let text = format!(
            "state_dir = \"{0}/state\"\n[[job]]\nname = \"j\"\nmode = \"zfs-raw\"\n\
             source = \"zfs:tank/enc\"\ntarget = \"{0}/t\"\n\
             key_config = \"{0}/k.conf\"\npassfile = \"{0}/k.pass\"\n{policy}",
            dir.path().display()
        );
        crate::config::load_str(&dir.path().join("c.toml"), &text)
            .unwrap()
            .jobs
            .remove(0)
    }

    fn sent(days: &[u32]) -> Vec<String> {
        days.iter()
            .map(|d| format!("202611{d:02}T000000Z"))
            .collect()
    }

    const LIST: [&str; 10] = [
        "zfs", "list", "-H", "-o", "name", "-t", "snapshot", "-d", "1", "tank/enc",
    ];
    const BMS: [&str; 10] = [
        "zfs", "list", "-H", "-o", "name", "-t", "bookmark", "-d", "1", "tank/enc",
    ];

    #[test]
    fn the_sent_snapshot_is_held_the_superseded_hold_released_and_the_rest_kept_by_policy() {
        let job = job("[job.retention]\nlast = 2\n");
        let r = ScriptedRunner::new();
        let s = |d: u32| format!("tank/enc@snapveil-j-202611{d:02}T000000Z");
        r.expect(
            &[
                "zfs",
                "bookmark",
                &s(4),
                "tank/enc#snapveil-j-20261104T000000Z",
            ],
            Output::ok(""),
        );
        r.expect(&["zfs", "hold", "snapveil-j", &s(4)], Output::ok(""));
        r.expect(
            &LIST,
            Output::ok(format!(
                "{}\n{}\ntank/enc@mine\n{}\n{}\n",
                s(1),
                s(2),
                s(3),
                s(4)
            )),
        );
        r.expect(
            &["zfs", "holds", "-H", &s(1), &s(2), &s(3)],
            Output::ok(format!(
                "{}\tsnapveil-j\tMon Nov 30 01:00 2026\n{}\tbackup-tool\tMon Nov 30 01:00 2026\n",
                s(3),
                s(2)
            )),
        );
        r.expect(&["zfs", "release", "snapveil-j", &s(3)], Output::ok(""));
        // last = 2: the sent one and day 3 stay; days 1 and 2 go (a user's hold on day
        // 2 makes its destroy fail: a warning, not an error).
        r.expect(&["zfs", "destroy", &s(1)], Output::ok(""));
        r.expect(
            &["zfs", "destroy", &s(2)],
            Output::fail(1, "cannot destroy snapshot: dataset is busy\n"),
        );
        r.expect(
            &BMS,
            Output::ok(
                "tank/enc#snapveil-j-20261103T000000Z\ntank/enc#snapveil-j-20261104T000000Z\ntank/enc#mine\n",
            ),
        );
        r.expect(
            &["zfs", "destroy", "tank/enc#snapveil-j-20261103T000000Z"],
            Output::ok(""),
        );
        after_send(
            &r,
            &Tools::default(),
            &job,
            "tank/enc",
            "snapveil-j-20261104T000000Z",
            false,
            &sent(&[1, 2, 3]),
        );
    }

    #[test]
    fn recursive_trees_hold_release_and_destroy_recursively_and_without_holds_carry_on() {
        let job = job("");
        let r = ScriptedRunner::new();
        let s = |d: u32| format!("tank/enc@snapveil-j-202611{d:02}T000000Z");
        r.expect(
            &[
                "zfs",
                "bookmark",
                &s(2),
                "tank/enc#snapveil-j-20261102T000000Z",
            ],
            Output::fail(1, "cannot create bookmark: unsupported\n"),
        );
        r.expect(
            &["zfs", "hold", "-r", "snapveil-j", &s(2)],
            Output::fail(2, "unrecognized command 'hold'\n"),
        );
        r.expect(&LIST, Output::ok(format!("{}\n{}\n", s(1), s(2))));
        r.expect(
            &["zfs", "holds", "-H", &s(1)],
            Output::fail(255, "invalid option 'H'\n"),
        );
        r.expect(
            &["zfs", "release", "-r", "snapveil-j", &s(1)],
            Output::fail(1, "cannot release hold: no such tag on this dataset\n"),
        );
        // No policy: only the sent one stays.
        r.expect(&["zfs", "destroy", "-r", &s(1)], Output::ok(""));
        r.expect(&BMS, Output::fail(1, "invalid type 'bookmark'\n"));
        after_send(
            &r,
            &Tools::default(),
            &job,
            "tank/enc",
            "snapveil-j-20261102T000000Z",
            true,
            &sent(&[1]),
        );
    }

    #[test]
    fn a_snapshot_a_killed_run_left_unsent_goes_whatever_the_policy() {
        let job = job("[job.retention]\nlast = 5\n");
        let r = ScriptedRunner::new();
        let s = |d: u32| format!("tank/enc@snapveil-j-202611{d:02}T000000Z");
        r.expect(
            &[
                "zfs",
                "bookmark",
                &s(3),
                "tank/enc#snapveil-j-20261103T000000Z",
            ],
            Output::ok(""),
        );
        r.expect(&["zfs", "hold", "snapveil-j", &s(3)], Output::ok(""));
        r.expect(&LIST, Output::ok(format!("{}\n{}\n{}\n", s(1), s(2), s(3))));
        r.expect(&["zfs", "holds", "-H", &s(1), &s(2)], Output::ok(""));
        // Day 2 was never sent (not on the target): destroyed; day 1 kept by last = 5.
        r.expect(&["zfs", "destroy", &s(2)], Output::ok(""));
        r.expect(&BMS, Output::ok(""));
        after_send(
            &r,
            &Tools::default(),
            &job,
            "tank/enc",
            "snapveil-j-20261103T000000Z",
            false,
            &sent(&[1]),
        );
    }

    fn get_tree(r: &ScriptedRunner, out: &str) {
        r.expect(
            &[
                "zfs",
                "get",
                "-H",
                "-p",
                "-r",
                "-t",
                "filesystem,volume",
                "-o",
                "name,property,value",
                "encryption,keystatus,encryptionroot",
                "tank/enc",
            ],
            Output::ok(out),
        );
    }

    #[test]
    fn a_tree_is_raw_when_all_encrypted_and_a_mixed_one_needs_age() {
        let r = ScriptedRunner::new();
        get_tree(
            &r,
            "tank/enc\tencryption\taes-256-gcm\ntank/enc\tkeystatus\tavailable\ntank/enc\tencryptionroot\ttank/enc\n\
             tank/enc/kid\tencryption\taes-256-gcm\ntank/enc/kid\tkeystatus\tunavailable\ntank/enc/kid\tencryptionroot\ttank/enc/kid\n",
        );
        let p = tree_protection(&r, &Tools::default(), &RawOptions::default(), "tank/enc").unwrap();
        assert_eq!(
            p,
            super::super::Protection {
                raw: true,
                age: false
            }
        );
        let mixed = "tank/enc\tencryption\toff\ntank/enc\tkeystatus\t-\ntank/enc\tencryptionroot\t-\n\
             tank/enc/kid\tencryption\taes-256-gcm\ntank/enc/kid\tkeystatus\tavailable\ntank/enc/kid\tencryptionroot\ttank/enc/kid\n";
        get_tree(&r, mixed);
        let e = tree_protection(&r, &Tools::default(), &RawOptions::default(), "tank/enc")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tank/enc") && e.contains("age_recipients"),
            "{e}"
        );
        get_tree(&r, mixed);
        let opts = RawOptions {
            age_recipients: vec!["age1x".into()],
            ..Default::default()
        };
        let p = tree_protection(&r, &Tools::default(), &opts, "tank/enc").unwrap();
        assert_eq!(
            p,
            super::super::Protection {
                raw: true,
                age: true
            }
        );
    }
}
