//! zfs-fuse has no `receive -s`, resume tokens, `send -w` or bookmarks: the exact command
//! lines of a `zfs://` target are pinned here; tests/vm/81-zfs-target.sh runs them on
//! OpenZFS.
use super::*;
use crate::exec::{scripted::ScriptedRunner, Exit, Output};
use std::collections::BTreeMap;

const DEST: &str = "pool2/bk/enc";

fn config(extra: &str) -> crate::config::Config {
    let text = format!(
        "state_dir = \"/nonexistent/state\"\n[[job]]\nname = \"j\"\nmode = \"zfs-raw\"\n\
         source = \"zfs:tank/enc\"\ntarget = \"zfs://backup@nas:2222/{DEST}\"\n{extra}"
    );
    crate::config::load_str(std::path::Path::new("/c.toml"), &text).unwrap()
}

fn addr(cfg: &crate::config::Config) -> ZfsAddress {
    cfg.jobs[0].target.zfs().unwrap().clone()
}

/// `ssh -p 2222 backup@nas 'zfs ...'` as ScriptedRunner sees it.
fn remote(line: &str) -> Vec<String> {
    ["ssh", "-p", "2222", "backup@nas", line]
        .map(String::from)
        .to_vec()
}

fn token_none(r: &ScriptedRunner) {
    r.expect(
        &remote(&format!(
            "zfs get -H -p -o value receive_resume_token {DEST}"
        )),
        Output::ok("-\n"),
    );
}

fn target_list(r: &ScriptedRunner, out: Output) {
    r.expect(
        &remote(&format!(
            "zfs list -H -p -o name,guid,createtxg -t snapshot -d 1 {DEST}"
        )),
        out,
    );
}

fn source_list(r: &ScriptedRunner, out: &str) {
    r.expect(
        &[
            "zfs",
            "list",
            "-H",
            "-p",
            "-o",
            "name,guid",
            "-t",
            "snapshot,bookmark",
            "-d",
            "1",
            "tank/enc",
        ],
        Output::ok(out),
    );
}

/// The target's snapshots, as `prepare` lists them before a run's send.
fn listed(rx: &Receiver<'_>) -> OnTarget {
    OnTarget {
        own: rx.snapshots().unwrap().unwrap_or_default(),
        children: BTreeMap::new(),
    }
}

const S2: &str = "snapveil-j-20261130T020000Z";

#[test]
fn first_run_sends_a_full_raw_stream_into_zfs_receive_s_u() {
    let cfg = config("");
    let a = addr(&cfg);
    let r = ScriptedRunner::new();
    let rx = Receiver::for_job(&r, &cfg, &cfg.jobs[0], &a);
    token_none(&r);
    assert_eq!(
        resume(&rx, cfg.jobs[0].raw.as_ref().unwrap(), false).unwrap(),
        None
    );
    target_list(
        &r,
        Output::fail(1, format!("cannot open '{DEST}': dataset does not exist\n")),
    );
    source_list(&r, &format!("tank/enc@{S2}\t42\n"));
    r.expect(
        &["zfs", "send", "-w", &format!("tank/enc@{S2}")],
        Output::ok("RAW"),
    );
    r.expect(
        &remote(&format!("zfs receive -s -u {DEST}")),
        Output::ok(""),
    );
    let got = send(
        &rx,
        cfg.jobs[0].raw.as_ref().unwrap(),
        &listed(&rx),
        "tank/enc",
        S2,
        true,
        false,
    )
    .unwrap();
    assert_eq!(got.base, None);
    assert_eq!(got.bytes, 3);
}

#[test]
fn an_increment_starts_at_the_newest_common_snapshot_by_guid_not_by_name() {
    let cfg = config("send_intermediates = true\n");
    let a = addr(&cfg);
    let r = ScriptedRunner::new();
    let rx = Receiver::for_job(&r, &cfg, &cfg.jobs[0], &a);
    // On the target: "old" (guid 7), "same-name" (guid 9, another snapshot that happens
    // to share a name with the source's), "renamed" (guid 8).
    target_list(
        &r,
        Output::ok(format!(
            "{DEST}@old\t7\t100\n{DEST}@renamed\t8\t300\n{DEST}@same-name\t9\t200\n"
        )),
    );
    source_list(
        &r,
        &format!("tank/enc@old\t7\ntank/enc@same-name\t99\ntank/enc@base\t8\ntank/enc#base\t8\ntank/enc@{S2}\t10\n"),
    );
    r.expect(
        &[
            "zfs",
            "send",
            "-w",
            "-I",
            "tank/enc@base",
            &format!("tank/enc@{S2}"),
        ],
        Output::ok("INC"),
    );
    r.expect(
        &remote(&format!("zfs receive -s -u {DEST}")),
        Output::ok(""),
    );
    let got = send(
        &rx,
        cfg.jobs[0].raw.as_ref().unwrap(),
        &listed(&rx),
        "tank/enc",
        S2,
        true,
        false,
    )
    .unwrap();
    assert_eq!(
        got.base,
        Some(Base {
            from: "tank/enc@base".into(),
            on_target: "renamed".into()
        })
    );
}

#[test]
fn a_bookmark_is_a_base_when_the_snapshot_is_gone_and_force_adds_dash_f() {
    let cfg = config("force = true\n");
    let a = addr(&cfg);
    let r = ScriptedRunner::new();
    let rx = Receiver::for_job(&r, &cfg, &cfg.jobs[0], &a);
    target_list(
        &r,
        Output::ok(format!("{DEST}@snapveil-j-20261130T010000Z\t5\t10\n")),
    );
    source_list(
        &r,
        &format!("tank/enc#snapveil-j-20261130T010000Z\t5\ntank/enc@{S2}\t6\n"),
    );
    r.expect(
        &[
            "zfs",
            "send",
            "-w",
            "-i",
            "tank/enc#snapveil-j-20261130T010000Z",
            &format!("tank/enc@{S2}"),
        ],
        Output::ok("INC"),
    );
    r.expect(
        &remote(&format!("zfs receive -s -u -F {DEST}")),
        Output::ok(""),
    );
    send(
        &rx,
        cfg.jobs[0].raw.as_ref().unwrap(),
        &listed(&rx),
        "tank/enc",
        S2,
        true,
        false,
    )
    .unwrap();
}

#[test]
fn a_target_with_nothing_in_common_is_refused_not_overwritten() {
    let cfg = config("");
    let a = addr(&cfg);
    let r = ScriptedRunner::new();
    let rx = Receiver::for_job(&r, &cfg, &cfg.jobs[0], &a);
    target_list(&r, Output::ok(format!("{DEST}@theirs\t1\t10\n")));
    source_list(&r, &format!("tank/enc@{S2}\t6\n"));
    let e = send(
        &rx,
        cfg.jobs[0].raw.as_ref().unwrap(),
        &listed(&rx),
        "tank/enc",
        S2,
        true,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("none that tank/enc still has") && e.contains("theirs"),
        "{e}"
    );
}

#[test]
fn an_interrupted_receive_is_resumed_from_its_token() {
    let cfg = config("");
    let a = addr(&cfg);
    let r = ScriptedRunner::new();
    let rx = Receiver::for_job(&r, &cfg, &cfg.jobs[0], &a);
    r.expect(
        &remote(&format!(
            "zfs get -H -p -o value receive_resume_token {DEST}"
        )),
        Output::ok("1-c0ffee-d8-789c\n"),
    );
    r.expect(
        &["zfs", "send", "-t", "1-c0ffee-d8-789c"],
        Output::ok("REST"),
    );
    r.expect(
        &remote(&format!("zfs receive -s -u {DEST}")),
        Output::ok(""),
    );
    assert_eq!(
        resume(&rx, cfg.jobs[0].raw.as_ref().unwrap(), false).unwrap(),
        Some(4)
    );
}

#[test]
fn a_resume_whose_base_is_gone_is_aborted_with_receive_dash_a_then_sent_anew() {
    let cfg = config("");
    let a = addr(&cfg);
    let r = ScriptedRunner::new();
    let rx = Receiver::for_job(&r, &cfg, &cfg.jobs[0], &a);
    let opts = cfg.jobs[0].raw.as_ref().unwrap();
    r.expect(
        &remote(&format!(
            "zfs get -H -p -o value receive_resume_token {DEST}"
        )),
        Output::ok("1-c0ffee-d8-789c\n"),
    );
    r.expect(
        &["zfs", "send", "-t", "1-c0ffee-d8-789c"],
        Output::fail(
            255,
            "cannot resume send: 'tank/enc@snapveil-j-20261130T010000Z' used in the initial send no longer exists\n",
        ),
    );
    r.expect(
        &remote(&format!("zfs receive -s -u {DEST}")),
        Output::fail(1, "cannot receive: failed to read from stream\n"),
    );
    r.expect(&remote(&format!("zfs receive -A {DEST}")), Output::ok(""));
    assert_eq!(resume(&rx, opts, false).unwrap(), None);
    // Then the run's normal send: here a full one (the aborted one was the first).
    target_list(
        &r,
        Output::fail(1, format!("cannot open '{DEST}': dataset does not exist\n")),
    );
    source_list(&r, &format!("tank/enc@{S2}\t6\n"));
    r.expect(
        &["zfs", "send", "-w", &format!("tank/enc@{S2}")],
        Output::ok("FULL"),
    );
    r.expect(
        &remote(&format!("zfs receive -s -u {DEST}")),
        Output::ok(""),
    );
    send(&rx, opts, &listed(&rx), "tank/enc", S2, true, false).unwrap();
}

#[test]
fn a_resume_that_fails_otherwise_keeps_the_receive_state() {
    let cfg = config("");
    let a = addr(&cfg);
    let r = ScriptedRunner::new();
    let rx = Receiver::for_job(&r, &cfg, &cfg.jobs[0], &a);
    r.expect(
        &remote(&format!(
            "zfs get -H -p -o value receive_resume_token {DEST}"
        )),
        Output::ok("1-c0ffee\n"),
    );
    r.expect(&["zfs", "send", "-t", "1-c0ffee"], Output::ok("REST"));
    r.expect(
        &remote(&format!("zfs receive -s -u {DEST}")),
        Output {
            exit: Exit::Code(255),
            stdout: Vec::new(),
            stderr: b"ssh: connect to host nas port 2222: Connection refused\n".to_vec(),
        },
    );
    let e = resume(&rx, cfg.jobs[0].raw.as_ref().unwrap(), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Connection refused"), "{e}");
    // No `zfs receive -A`: the ScriptedRunner would have panicked on it.
}

#[test]
fn target_retention_never_destroys_the_newest_common_snapshot_nor_foreign_ones() {
    let cfg = config("[job.retention]\nlast = 1\n");
    let a = addr(&cfg);
    let r = ScriptedRunner::new();
    let rx = Receiver::for_job(&r, &cfg, &cfg.jobs[0], &a);
    let (s1, s2, s3) = (
        "snapveil-j-20261128T010000Z",
        "snapveil-j-20261129T010000Z",
        "snapveil-j-20261130T010000Z",
    );
    let listing = format!(
        "{DEST}@{s1}\t1\t10\n{DEST}@manual\t4\t15\n{DEST}@{s2}\t2\t20\n{DEST}@{s3}\t3\t30\n"
    );
    // The newest one on the target (s3) is not on the source (say, a run whose snapshot
    // and bookmark were destroyed there): the next base is s2, which the policy would drop.
    let source = format!("tank/enc#{s1}\t1\ntank/enc@{s2}\t2\n");
    for dry in [true, false] {
        target_list(&r, Output::ok(listing.clone()));
        source_list(&r, &source);
        if !dry {
            r.expect(&remote(&format!("zfs destroy {DEST}@{s1}")), Output::ok(""));
        }
        let d = prune(&rx, &cfg.jobs[0], "tank/enc", dry).unwrap().unwrap();
        let kept: Vec<(&str, bool)> = d.iter().map(|d| (d.snapshot.as_str(), d.keep)).collect();
        assert_eq!(kept, [(s3, true), (s2, true), (s1, false)]);
        assert!(d[1].why.contains("next increment's base"), "{:?}", d[1]);
        let text = report(&a, &d, dry);
        let verb = if dry { "would destroy" } else { "destroyed" };
        assert!(
            text.contains(&format!("{verb} zfs://backup@nas:2222/{DEST}@{s1}")),
            "{text}"
        );
    }
}

#[test]
fn plain_datasets_never_go_to_a_zfs_target() {
    let e = raw_or_refuse(None, "tank/plain").unwrap_err().to_string();
    assert!(
        e.contains("never sends an unencrypted stream") && e.contains("tank/plain"),
        "{e}"
    );
    let enc = ("aes-256-gcm".to_string(), "available".to_string());
    assert!(raw_or_refuse(Some(&enc), "tank/enc").unwrap());
}

#[test]
fn restore_sends_the_replica_back_raw_into_a_new_dataset() {
    let cfg = config("");
    let a = addr(&cfg);
    let r = ScriptedRunner::new();
    let rx = Receiver::for_job(&r, &cfg, &cfg.jobs[0], &a);
    r.expect(
        &["zfs", "list", "-H", "-o", "name", "tank/back"],
        Output::fail(1, "cannot open 'tank/back': dataset does not exist\n"),
    );
    target_list(&r, Output::ok(format!("{DEST}@{S2}\t6\t10\n")));
    r.expect(
        &remote(&format!("zfs send -w {DEST}@{S2}")),
        Output::ok("RAW"),
    );
    r.expect(&["zfs", "receive", "-u", "tank/back"], Output::ok(""));
    let got = restore(&rx, &cfg.jobs[0], "20261130T020000Z", "tank/back").unwrap();
    assert_eq!(got, format!("tank/back@{S2}"));
}

#[test]
fn a_local_target_runs_zfs_here_and_remote_lines_are_quoted() {
    let cfg = config("");
    let local = ZfsAddress {
        user: None,
        host: None,
        port: None,
        dataset: "tank2/bk".into(),
    };
    let r = ScriptedRunner::new();
    let rx = Receiver::for_job(&r, &cfg, &cfg.jobs[0], &local);
    assert_eq!(
        rx.zfs(&["receive", "-s", "-u", "tank2/bk"]).argv(),
        ["zfs", "receive", "-s", "-u", "tank2/bk"]
    );
    let a = addr(&cfg);
    let rx = Receiver::for_job(&r, &cfg, &cfg.jobs[0], &a);
    assert_eq!(
        rx.zfs(&["send", "-t", "a b'c"]).argv(),
        remote("zfs send -t 'a b'\\''c'")
    );
}

#[test]
fn zfs_targets_are_for_raw_jobs_without_age_only() {
    let base = "state_dir = \"/s\"\n[[job]]\nname = \"f\"\nsource = \"dir:/srv\"\n\
                target = \"zfs://h/p/d\"\nkey_config = \"/k\"\npassfile = \"/p\"\n";
    let e = crate::config::load_str(std::path::Path::new("/c.toml"), base)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/c.toml:5: job[0].target") && e.contains("job \"f\"") && e.contains("zfs-raw"),
        "{e}"
    );
    let aged = "state_dir = \"/s\"\n[[job]]\nname = \"r\"\nmode = \"zfs-raw\"\n\
                source = \"zfs:t/d\"\ntarget = \"zfs://h/p/d\"\nwrap_raw = true\n";
    let e = crate::config::load_str(std::path::Path::new("/c.toml"), aged)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("job[0].wrap_raw") && e.contains("never age"),
        "{e}"
    );
    let forced = "state_dir = \"/s\"\n[[job]]\nname = \"r\"\nmode = \"zfs-raw\"\n\
                  source = \"zfs:t/d\"\ntarget = \"/t\"\nforce = true\n";
    let e = crate::config::load_str(std::path::Path::new("/c.toml"), forced)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/c.toml:7: job[0].force"), "{e}");
    let bad = "state_dir = \"/s\"\n[[job]]\nname = \"r\"\nmode = \"zfs-raw\"\n\
               source = \"zfs:t/d\"\ntarget = \"zfs://h:0/p\"\n";
    let e = crate::config::load_str(std::path::Path::new("/c.toml"), bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/c.toml:6: job[0].target: bad port"), "{e}");
    let dflt = "state_dir = \"/s\"\ntarget = \"zfs:///tank2/bk\"\n[[job]]\nname = \"r\"\n\
                mode = \"zfs-raw\"\nsource = \"zfs:t/d\"\n";
    let cfg = crate::config::load_str(std::path::Path::new("/c.toml"), dflt).unwrap();
    assert_eq!(cfg.jobs[0].target.to_string(), "zfs:///tank2/bk/r");
}

/// A recursive job's `zfs get -r` of the resume tokens under DEST.
fn tokens_r(r: &ScriptedRunner, out: &str) {
    r.expect(
        &remote(&format!(
            "zfs get -H -p -r -t filesystem,volume -o name,value receive_resume_token {DEST}"
        )),
        Output::ok(out),
    );
}

/// A recursive job's `zfs list -r` of the snapshots under DEST.
fn target_tree(r: &ScriptedRunner, out: &str) {
    r.expect(
        &remote(&format!(
            "zfs list -H -p -o name,guid,createtxg -t snapshot -r {DEST}"
        )),
        Output::ok(out),
    );
}

fn source_tree_list(r: &ScriptedRunner, out: &str) {
    r.expect(
        &[
            "zfs",
            "list",
            "-H",
            "-p",
            "-o",
            "name,guid",
            "-t",
            "snapshot",
            "-r",
            "tank/enc",
        ],
        Output::ok(out),
    );
}

const S1: &str = "snapveil-j-20261129T020000Z";
const S0: &str = "snapveil-j-20261128T020000Z";

#[test]
fn a_recursive_job_resumes_every_child_that_holds_a_token() {
    let cfg = config("[job.snapshot]\nrecursive = true\n");
    let a = addr(&cfg);
    let r = ScriptedRunner::new();
    let rx = Receiver::for_job(&r, &cfg, &cfg.jobs[0], &a);
    tokens_r(
        &r,
        &format!("{DEST}\t-\n{DEST}/vault\t1-vault-tok\n{DEST}/logs\t1-logs-tok\n{DEST}/zz\t-\n"),
    );
    // Parents first, by name: logs before vault.
    r.expect(&["zfs", "send", "-t", "1-logs-tok"], Output::ok("LOGS"));
    r.expect(
        &remote(&format!("zfs receive -s -u {DEST}/logs")),
        Output::ok(""),
    );
    r.expect(&["zfs", "send", "-t", "1-vault-tok"], Output::ok("VAULT!"));
    r.expect(
        &remote(&format!("zfs receive -s -u {DEST}/vault")),
        Output::ok(""),
    );
    assert_eq!(
        resume(&rx, cfg.jobs[0].raw.as_ref().unwrap(), true).unwrap(),
        Some(10)
    );
}

#[test]
fn a_replication_stream_cut_in_a_child_is_sent_again_before_the_next_increment() {
    let cfg = config("[job.snapshot]\nrecursive = true\n");
    let a = addr(&cfg);
    let r = ScriptedRunner::new();
    let rx = Receiver::for_job(&r, &cfg, &cfg.jobs[0], &a);
    // S0 reached everything; the run of S1 was cut after DEST and `logs`: `zz` lacks S1.
    // `new`, created on the source after S0, is in S1's stream too.
    target_tree(
        &r,
        &format!(
            "{DEST}@{S0}\t10\t100\n{DEST}@{S1}\t11\t200\n{DEST}/logs@{S0}\t20\t100\n\
             {DEST}/logs@{S1}\t21\t200\n{DEST}/zz@{S0}\t30\t100\n"
        ),
    );
    let on_target = rx.tree().unwrap().unwrap();
    assert_eq!(on_target.own.len(), 2);
    assert_eq!(on_target.children["zz"].len(), 1);
    source_list(
        &r,
        &format!("tank/enc@{S0}\t10\ntank/enc@{S1}\t11\ntank/enc@{S2}\t12\n"),
    );
    source_tree_list(
        &r,
        &format!(
            "tank/enc@{S0}\t10\ntank/enc@{S1}\t11\ntank/enc@{S2}\t12\n\
             tank/enc/logs@{S0}\t20\ntank/enc/logs@{S1}\t21\ntank/enc/logs@{S2}\t22\n\
             tank/enc/zz@{S0}\t30\ntank/enc/zz@{S1}\t31\ntank/enc/zz@{S2}\t32\n\
             tank/enc/new@{S1}\t41\ntank/enc/new@{S2}\t42\n"
        ),
    );
    r.expect(
        &[
            "zfs",
            "send",
            "-w",
            "-R",
            "-i",
            &format!("tank/enc@{S0}"),
            &format!("tank/enc@{S1}"),
        ],
        Output::ok("AGAIN"),
    );
    r.expect(
        &remote(&format!("zfs receive -s -u {DEST}")),
        Output::ok(""),
    );
    r.expect(
        &[
            "zfs",
            "send",
            "-w",
            "-R",
            "-i",
            &format!("tank/enc@{S1}"),
            &format!("tank/enc@{S2}"),
        ],
        Output::ok("NEXT"),
    );
    r.expect(
        &remote(&format!("zfs receive -s -u {DEST}")),
        Output::ok(""),
    );
    let got = send(
        &rx,
        cfg.jobs[0].raw.as_ref().unwrap(),
        &on_target,
        "tank/enc",
        S2,
        true,
        true,
    )
    .unwrap();
    assert_eq!(got.bytes, 9, "both streams count");
    assert_eq!(got.base.unwrap().on_target, S1);
}

#[test]
fn a_complete_tree_is_not_sent_again() {
    let cfg = config("[job.snapshot]\nrecursive = true\n");
    let a = addr(&cfg);
    let r = ScriptedRunner::new();
    let rx = Receiver::for_job(&r, &cfg, &cfg.jobs[0], &a);
    target_tree(
        &r,
        &format!("{DEST}@{S1}\t11\t200\n{DEST}/logs@{S1}\t21\t200\n"),
    );
    let on_target = rx.tree().unwrap().unwrap();
    source_list(&r, &format!("tank/enc@{S1}\t11\ntank/enc@{S2}\t12\n"));
    // A child destroyed on the target but not on the source would be missing; one the
    // source no longer has (`gone`) is not looked at.
    source_tree_list(
        &r,
        &format!("tank/enc@{S1}\t11\ntank/enc@{S2}\t12\ntank/enc/logs@{S1}\t21\ntank/enc/logs@{S2}\t22\n"),
    );
    r.expect(
        &[
            "zfs",
            "send",
            "-w",
            "-R",
            "-i",
            &format!("tank/enc@{S1}"),
            &format!("tank/enc@{S2}"),
        ],
        Output::ok("NEXT"),
    );
    r.expect(
        &remote(&format!("zfs receive -s -u {DEST}")),
        Output::ok(""),
    );
    let opts = cfg.jobs[0].raw.as_ref().unwrap();
    assert_eq!(
        send(&rx, opts, &on_target, "tank/enc", S2, true, true)
            .unwrap()
            .bytes,
        4
    );
}

#[test]
fn a_first_replication_stream_cut_in_a_child_is_refused_without_force() {
    let cfg = config("[job.snapshot]\nrecursive = true\n");
    let a = addr(&cfg);
    let r = ScriptedRunner::new();
    let rx = Receiver::for_job(&r, &cfg, &cfg.jobs[0], &a);
    target_tree(&r, &format!("{DEST}@{S1}\t11\t200\n"));
    let on_target = rx.tree().unwrap().unwrap();
    source_list(&r, &format!("tank/enc@{S1}\t11\ntank/enc@{S2}\t12\n"));
    source_tree_list(
        &r,
        &format!("tank/enc@{S1}\t11\ntank/enc@{S2}\t12\ntank/enc/logs@{S1}\t21\n"),
    );
    let opts = cfg.jobs[0].raw.as_ref().unwrap();
    let e = send(&rx, opts, &on_target, "tank/enc", S2, true, true)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("{DEST}/logs")) && e.contains("force = true"),
        "{e}"
    );
    // Nothing was sent: the ScriptedRunner would have panicked on a `zfs send`.

    // With force, but DEST holds a snapshot the source lacks: refused, nothing destroyed.
    let cfg = config("force = true\n[job.snapshot]\nrecursive = true\n");
    let a = addr(&cfg);
    let rx = Receiver::for_job(&r, &cfg, &cfg.jobs[0], &a);
    let mut odd = on_target.clone();
    odd.own.insert(
        0,
        TargetSnap {
            name: "theirs".into(),
            guid: 99,
            createtxg: 1,
        },
    );
    source_list(&r, &format!("tank/enc@{S1}\t11\ntank/enc@{S2}\t12\n"));
    source_tree_list(
        &r,
        &format!("tank/enc@{S1}\t11\ntank/enc@{S2}\t12\ntank/enc/logs@{S1}\t21\n"),
    );
    let opts = cfg.jobs[0].raw.as_ref().unwrap();
    let e = send(&rx, opts, &odd, "tank/enc", S2, true, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&format!("{DEST}@theirs")), "{e}");

    // With force, and the source has all of it: DEST destroyed there, the tree sent in
    // full, then the increment.
    source_list(&r, &format!("tank/enc@{S1}\t11\ntank/enc@{S2}\t12\n"));
    source_tree_list(
        &r,
        &format!("tank/enc@{S1}\t11\ntank/enc@{S2}\t12\ntank/enc/logs@{S1}\t21\n"),
    );
    r.expect(&remote(&format!("zfs destroy -r {DEST}")), Output::ok(""));
    r.expect(
        &["zfs", "send", "-w", "-R", &format!("tank/enc@{S1}")],
        Output::ok("FULL"),
    );
    r.expect(
        &remote(&format!("zfs receive -s -u -F {DEST}")),
        Output::ok(""),
    );
    r.expect(
        &[
            "zfs",
            "send",
            "-w",
            "-R",
            "-i",
            &format!("tank/enc@{S1}"),
            &format!("tank/enc@{S2}"),
        ],
        Output::ok("NEXT"),
    );
    r.expect(
        &remote(&format!("zfs receive -s -u -F {DEST}")),
        Output::ok(""),
    );
    send(&rx, opts, &on_target, "tank/enc", S2, true, true).unwrap();
}

#[test]
fn a_failed_send_keeps_the_snapshot_when_the_target_holds_a_token_or_the_snapshot() {
    let cfg = config("[job.snapshot]\nrecursive = true\n");
    let a = addr(&cfg);
    let r = ScriptedRunner::new();
    let rx = Receiver::for_job(&r, &cfg, &cfg.jobs[0], &a);
    tokens_r(&r, &format!("{DEST}\t-\n{DEST}/logs\t1-tok\n"));
    assert_eq!(
        left_on_target(&rx, true, S2).unwrap(),
        Some("the target saved the interrupted receive")
    );
    // Cut between two datasets: no token, but DEST has the snapshot.
    tokens_r(&r, &format!("{DEST}\t-\n"));
    target_list(
        &r,
        Output::ok(format!("{DEST}@{S1}\t11\t1\n{DEST}@{S2}\t12\t2\n")),
    );
    assert_eq!(
        left_on_target(&rx, true, S2).unwrap(),
        Some("the target holds it in part of the tree")
    );
    // Nothing arrived.
    tokens_r(&r, &format!("{DEST}\t-\n"));
    target_list(&r, Output::ok(format!("{DEST}@{S1}\t11\t1\n")));
    assert_eq!(left_on_target(&rx, true, S2).unwrap(), None);
}
