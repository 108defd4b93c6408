//! `snapveil verify JOB --deep` for raw jobs: besides each stream file's sha1 and each
//! increment's base, reads every whole stream once and checks what really validates it:
//!
//! * **age** (streams snapveil encrypted): decrypted to nowhere with the job's identity or
//!   passphrase. age's STREAM authenticates every 64 KiB chunk and marks the last one, so
//!   an altered, truncated, cut-and-spliced or reordered file fails here, whatever its
//!   sha1 file says. Without the identity (a recipients-only job on a host that holds only
//!   public keys) nothing decrypts, and the report says that only sha1 (and the zstream
//!   check of raw streams not wrapped in age) was possible.
//! * **`zstream dump`** over the plaintext ZFS stream: OpenZFS checksums every record
//!   header (fletcher4 over the stream so far) and ends each stream with the checksum of
//!   all of it, and `zstream dump` checks both. It exits 0 even then, so its output is
//!   read: "Incorrect checksum in record header", "Expected checksum differs", an invalid
//!   record, or fewer END records than BEGIN records (a stream cut short) is a bad stream.
//!   For raw (`zfs send -w`) streams these checksums cover the ciphertext, so this is the
//!   check a host without the dataset's key can make.
//! * **`zfs receive -n`** of a full stream into a name that does not exist in the
//!   source's pool: libzfs then reads the BEGIN record, checks names and the stream's
//!   structure to its END record and stops, without any checksum (libzfs `recv_skip`
//!   passes no checksum) and without creating anything. An increment cannot be checked
//!   this way (its destination must exist and hold its base), so increments get age and
//!   zstream only. It is run because it is what a restore's first step will do.
//!
//! Measured on OpenZFS 2.1.11 (tests/vm/82-zfs-chain.sh, a raw full stream whose sha1 was
//! forged along with it): one flipped byte passes `zfs receive -n` (exit 0) and `zstream
//! dump` exits 0 but prints "Incorrect checksum in record header"; a stream cut in half
//! fails `zfs receive -n` ("failed to read from stream") and shows 0 END records in
//! `zstream dump`; two 64 KiB blocks swapped fail both ("invalid record type", the header
//! checksum).

use super::record::StreamRecord;
use super::{age_io, zfs, ZfsSendError};
use crate::config::Job;
use crate::exec::{Cmd, CommandError, Line, Runner, RunningChild};
use crate::target::{Area, Target};
use std::io::{self, Read};
use std::path::Path;

/// What `verify --deep` found.
#[derive(Debug, Default)]
pub struct DeepReport {
    pub points: usize,
    /// Problems, one line each, naming the file.
    pub bad: Vec<String>,
    /// What was checked, per stream file.
    pub checked: Vec<String>,
    /// What could not be checked, and why.
    pub notes: Vec<String>,
}

/// `zstream` beside the configured `zfs` (the same install), else from `PATH`.
fn zstream_cmd(tools: &crate::snapshot::Tools) -> Cmd {
    let z = Path::new(&tools.zfs);
    match z.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(dir) => Cmd::new(dir.join("zstream")),
        None => Cmd::new("zstream"),
    }
}

/// Judges `zstream dump`'s output (it exits 0 after a checksum mismatch).
pub fn zstream_verdict(out: &str) -> Result<String, String> {
    for needle in [
        "Incorrect checksum in record header",
        "invalid checksum",
        "Expected checksum differs",
        "INVALID record",
        "Invalid stream",
    ] {
        if let Some(l) = out.lines().find(|l| l.contains(needle)) {
            return Err(format!("zstream dump: {}", l.trim()));
        }
    }
    let count = |what: &str| -> Option<u64> {
        out.lines()
            .find(|l| l.contains(&format!("Total {what} records")))
            .and_then(|l| l.split('=').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    match (count("DRR_BEGIN"), count("DRR_END")) {
        (Some(b), Some(e)) if b >= 1 && e >= b => Ok(format!(
            "zstream dump: record checksums and END checksum ok ({b} BEGIN, {e} END)"
        )),
        (Some(b), Some(e)) => Err(format!(
            "zstream dump: {b} BEGIN and {e} END records: the stream is cut short"
        )),
        _ => Err("zstream dump: no summary (not a ZFS stream?)".into()),
    }
}

struct Child {
    name: &'static str,
    cmd: Cmd,
    child: Box<dyn RunningChild>,
    stdin: Option<Box<dyn io::Write + Send>>,
    lines: std::sync::mpsc::Receiver<Line>,
}

impl Child {
    fn start(runner: &dyn Runner, name: &'static str, cmd: Cmd) -> Result<Child, ZfsSendError> {
        let mut child = runner
            .spawn(&cmd)
            .map_err(|e| CommandError::spawn(&cmd, e))?;
        let stdin = child.take_stdin();
        let lines = child.take_lines();
        Ok(Child {
            name,
            cmd,
            child,
            stdin,
            lines,
        })
    }

    /// Feeds `buf`; a child that stopped reading (e.g. `zfs receive -n` after the END
    /// record, or after an error it will report) is fed no more.
    fn feed(&mut self, buf: &[u8]) {
        if let Some(s) = self.stdin.as_mut() {
            if s.write_all(buf).is_err() {
                self.stdin = None;
            }
        }
    }

    fn finish(mut self) -> Result<(bool, String), ZfsSendError> {
        self.stdin = None;
        let mut text = String::new();
        for l in self.lines.iter() {
            let (Line::Stdout(b) | Line::Stderr(b)) = l;
            text.push_str(&String::from_utf8_lossy(&b));
            text.push('\n');
        }
        let out = self
            .child
            .wait()
            .map_err(|e| CommandError::spawn(&self.cmd, e))?;
        Ok((out.exit.success(), text))
    }
}

/// Runs the deep checks over every restore point's stream file.
///
/// # Errors
/// The target cannot be read; bad streams are reported, not errors.
pub fn verify_deep(
    runner: &dyn Runner,
    tools: &crate::snapshot::Tools,
    job: &Job,
    target: &Target,
    state: Option<&crate::target::chain::Head>,
    identity: Option<&Path>,
) -> Result<DeepReport, ZfsSendError> {
    let (recs, bad) = super::verify(runner, job, target, state)?;
    let mut rep = DeepReport {
        points: recs.len(),
        bad,
        ..Default::default()
    };
    let opts = job.raw.clone().unwrap_or_default();
    let can_decrypt = opts.age_passphrase_file.is_some() || identity.is_some();
    if recs.iter().any(|r| r.age) && !can_decrypt {
        rep.notes.push(
            "no age identity (a recipients-only job: set age_identity_file where the identity \
             is): --deep can only check sha1 here, and zstream for raw streams not wrapped in \
             age; the age streams were neither authenticated nor parsed"
                .into(),
        );
    }
    // Spawning fails when it is not installed (zfs-fuse, OpenZFS before 2.0).
    let zstream_ok = runner.output(&zstream_cmd(tools).arg("-h")).is_ok();
    if !zstream_ok {
        rep.notes.push(format!(
            "{}: not found: stream checksums not checked (OpenZFS 2.0 or later has it)",
            zstream_cmd(tools)
        ));
    }
    let scratch = scratch_name(runner, tools, job, &mut rep.notes);
    for r in &recs {
        let Some(copy) = target.local_copy(runner, Area::Streams, &r.file)? else {
            continue; // reported missing by the sha1 pass
        };
        let shown = format!("streams/{}", r.file);
        if r.age && !can_decrypt {
            continue;
        }
        match deep_one(
            runner,
            tools,
            r,
            &copy.path,
            &opts,
            identity,
            zstream_ok,
            scratch.as_deref(),
        ) {
            Ok(done) => rep.checked.push(format!("{shown}: {}", done.join("; "))),
            Err(why) => rep.bad.push(format!("{shown}: {why}")),
        }
        if let Some(s) = &scratch {
            if super::dataset_exists(runner, tools, s) {
                rep.bad.push(format!(
                    "{s} exists after `zfs receive -n`: remove it (it was not there before)"
                ));
            }
        }
    }
    Ok(rep)
}

/// A dataset name in the source's pool that does not exist, for `zfs receive -n` of full
/// streams; `None` (with a note) when the pool is not on this host.
fn scratch_name(
    runner: &dyn Runner,
    tools: &crate::snapshot::Tools,
    job: &Job,
    notes: &mut Vec<String>,
) -> Option<String> {
    let crate::snapshot::Source::Zfs { dataset } = &job.source else {
        return None;
    };
    let pool = dataset.split('/').next().unwrap_or(dataset);
    if !super::dataset_exists(runner, tools, pool) {
        notes.push(format!(
            "pool {pool} is not on this host: `zfs receive -n` not run"
        ));
        return None;
    }
    let name = format!("{pool}/snapveil-verify-{}", job.name);
    if super::dataset_exists(runner, tools, &name) {
        notes.push(format!("{name} exists: `zfs receive -n` not run"));
        return None;
    }
    Some(name)
}

/// One stream: decrypt (age) and feed zstream dump and, for a full stream, `zfs receive
/// -n`. Returns what passed, or the first failure.
#[allow(clippy::too_many_arguments)]
fn deep_one(
    runner: &dyn Runner,
    tools: &crate::snapshot::Tools,
    r: &StreamRecord,
    file: &Path,
    opts: &crate::config::RawOptions,
    identity: Option<&Path>,
    zstream: bool,
    scratch: Option<&str>,
) -> Result<Vec<String>, String> {
    let f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut input: Box<dyn Read> = if r.age {
        age_io::decryptor(opts, identity, io::BufReader::new(f)).map_err(|e| e.to_string())?
    } else {
        Box::new(f)
    };
    let mut kids = Vec::new();
    if zstream {
        kids.push(
            Child::start(runner, "zstream", zstream_cmd(tools).arg("dump"))
                .map_err(|e| e.to_string())?,
        );
    }
    let receive = scratch.filter(|_| r.base.is_none());
    if let Some(s) = receive {
        kids.push(
            Child::start(
                runner,
                "receive",
                zfs(tools).args(["receive", "-n", "-v", "-u", s]),
            )
            .map_err(|e| e.to_string())?,
        );
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut age_err = None;
    loop {
        match input.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => kids.iter_mut().for_each(|c| c.feed(&buf[..k])),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                age_err = Some(e);
                break;
            }
        }
    }
    let mut done = Vec::new();
    let mut results = Vec::new();
    for k in kids {
        let name = k.name;
        let cmd = k.cmd.to_string();
        results.push((name, cmd, k.finish().map_err(|e| e.to_string())?));
    }
    if let Some(e) = age_err {
        return Err(format!(
            "age: {e}: the stream was altered, cut or reordered (authentication failed)"
        ));
    }
    if r.age {
        done.push("age: every chunk authenticated".to_string());
    }
    for (name, cmd, (ok, text)) in results {
        match name {
            "zstream" => done.push(zstream_verdict(&text)?),
            _ if ok => done.push(format!("{cmd}: ok")),
            _ => {
                return Err(format!(
                    "{cmd} refused it: {}",
                    text.lines()
                        .rfind(|l| !l.trim().is_empty())
                        .unwrap_or("")
                        .trim()
                ))
            }
        }
    }
    if receive.is_none() && r.base.is_some() {
        done.push("increment: no `zfs receive -n` (it needs its base)".into());
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstream_output_is_read_for_checksums_and_cut_streams() {
        let good = "BEGIN record\n\ttoname = p/d@s\nEND checksum = 1/2/3/4\nSUMMARY:\n\
                    \tTotal DRR_BEGIN records = 1 (0 bytes)\n\tTotal DRR_END records = 1 (0 bytes)\n";
        assert!(zstream_verdict(good).is_ok());
        let bad = "BEGIN record\ninvalid checksum\nIncorrect checksum in record header.\nSUMMARY:\n\
                   \tTotal DRR_BEGIN records = 1 (0 bytes)\n\tTotal DRR_END records = 0 (0 bytes)\n";
        assert!(zstream_verdict(bad).unwrap_err().contains("checksum"));
        let cut = "BEGIN record\nSUMMARY:\n\tTotal DRR_BEGIN records = 1 (0 bytes)\n\
                   \tTotal DRR_END records = 0 (0 bytes)\n";
        assert!(zstream_verdict(cut).unwrap_err().contains("cut short"));
        // A replication (-R) package: one more END than BEGIN.
        let pkg = "SUMMARY:\n\tTotal DRR_BEGIN records = 3 (0 bytes)\n\tTotal DRR_END records = 4 (0 bytes)\n";
        assert!(zstream_verdict(pkg).is_ok());
        assert!(zstream_verdict("garbage").is_err());
    }
}
