//! What the last run of each job did, for `snapveil status`, for monitoring
//! (`STATE_DIR/snapveil.prom`, node_exporter's textfile collector) and for the target's
//! `runs/STAMP.json` record. Files are written to a temporary name and renamed, so a
//! reader never sees half a file.

use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// How a run ended. Serialized (status files, `runs/STAMP.json`) and displayed as
/// `"success"`, `"warning"` or `"failure"`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RunResult {
    /// Everything was backed up.
    Success,
    /// Backed up, with something to know (e.g. files vanished during the transfer).
    Warning,
    /// The run failed; the status's `error` says why.
    Failure,
}

impl RunResult {
    pub fn as_str(self) -> &'static str {
        match self {
            RunResult::Success => "success",
            RunResult::Warning => "warning",
            RunResult::Failure => "failure",
        }
    }

    /// Whether the run backed up (a warning counts as success).
    pub fn succeeded(self) -> bool {
        self != RunResult::Failure
    }
}

impl std::fmt::Display for RunResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, not `write_str`: `snapveil status` aligns it in a column.
        f.pad(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunStatus {
    pub job: String,
    pub stamp: String,
    pub result: RunResult,
    pub started: String,
    pub finished: String,
    pub duration_s: f64,
    pub bytes_sent: u64,
    pub files_transferred: u64,
    /// False for `dir:` sources: read live, not from a snapshot.
    pub consistent: bool,
    pub generations: Option<u64>,
    pub error: Option<String>,
    /// Raw ZFS jobs: what the target holds after the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw: Option<RawStatus>,
}

/// A raw ZFS job's target ([`crate::zfs_send`]), as `status` and the metrics report it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RawStatus {
    /// `DATASET@SNAPSHOT` of the newest restore point on the target.
    pub last_snapshot: String,
    /// Stream files a restore of the newest point replays (its full stream and increments).
    pub chain_length: u64,
    pub restore_points: u64,
}

/// Writes `data` to `path` atomically (temp file `.NAME.tmp-PID` in the same directory,
/// then rename). On failure (a full disk) the temp file is removed: nothing else ever
/// would, and on a target it would sit beside the manifests for ever.
///
/// # Errors
/// I/O errors, with the path.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |w| w.write_all(data))
}

/// [`write_atomic`] of what `write` produces, streamed: a big file (a run's manifest)
/// is never held in memory as a whole.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f"),
        std::process::id()
    ));
    let r = fs::File::create(&tmp)
        .and_then(|f| {
            let mut w = std::io::BufWriter::with_capacity(1 << 16, f);
            write(&mut w)?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if r.is_err() {
        remove_or_warn(&tmp);
    }
    r
}

/// Removes a file this process made and no longer needs (a temp file, a scratch file):
/// one already gone is fine, one that cannot be removed is logged, not an error.
pub fn remove_or_warn(path: &Path) {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(path = %path.display(), "cannot remove: {e}");
        }
        _ => {}
    }
}

/// The PID in a [`write_atomic`] temp file name, `.NAME.tmp-PID`.
fn tmp_pid(name: &str) -> Option<u32> {
    let (head, pid) = name.rsplit_once(".tmp-")?;
    if !head.starts_with('.') || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Removes [`write_atomic`] temp files in `dir` left by a process that no longer runs
/// (killed between create and rename); returns what it removed.
pub fn sweep_tmp_files(dir: &Path) -> Vec<PathBuf> {
    crate::scratch::sweep_by(dir, tmp_pid)
}

fn status_path(state_dir: &Path, job: &str) -> PathBuf {
    state_dir.join("status").join(format!("{job}.json"))
}

/// # Errors
/// I/O errors writing the status file.
pub fn save(state_dir: &Path, s: &RunStatus) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(s).expect("status serializes");
    write_atomic(&status_path(state_dir, &s.job), &json)
}

pub fn load(state_dir: &Path, job: &str) -> Option<RunStatus> {
    serde_json::from_slice(&fs::read(status_path(state_dir, job)).ok()?).ok()
}

/// Prometheus text exposition of the last run of each job.
pub fn prometheus(statuses: &[RunStatus]) -> String {
    let mut out = String::new();
    type Metric = (
        &'static str,
        &'static str,
        &'static str,
        fn(&RunStatus) -> f64,
    );
    let metrics: [Metric; 8] = [
        (
            "snapveil_last_run_success",
            "gauge",
            "1 if the last run succeeded (warnings count as success)",
            |s| s.result.succeeded() as u8 as f64,
        ),
        (
            "snapveil_last_run_timestamp_seconds",
            "gauge",
            "end of the last run, unix time",
            |s| {
                chrono::DateTime::parse_from_rfc3339(&s.finished)
                    .map(|t| t.timestamp() as f64)
                    .unwrap_or(0.0)
            },
        ),
        (
            "snapveil_last_run_duration_seconds",
            "gauge",
            "duration of the last run",
            |s| s.duration_s,
        ),
        (
            "snapveil_last_run_bytes_sent",
            "gauge",
            "bytes sent in the last run (by rsync; a raw ZFS job: its stream file)",
            |s| s.bytes_sent as f64,
        ),
        (
            "snapveil_last_run_consistent",
            "gauge",
            "1 if the last run read a snapshot (0 for dir: sources)",
            |s| s.consistent as u8 as f64,
        ),
        (
            "snapveil_generations",
            "gauge",
            "generation directories on the target",
            |s| s.generations.unwrap_or(0) as f64,
        ),
        (
            "snapveil_raw_chain_length",
            "gauge",
            "raw ZFS jobs: stream files the newest restore point's chain holds (full + increments)",
            |s| s.raw.as_ref().map_or(0.0, |r| r.chain_length as f64),
        ),
        (
            "snapveil_raw_restore_points",
            "gauge",
            "raw ZFS jobs: restore points (stream records) on the target",
            |s| s.raw.as_ref().map_or(0.0, |r| r.restore_points as f64),
        ),
    ];
    for (name, kind, help, f) in metrics {
        let raw_only = name.starts_with("snapveil_raw_");
        if raw_only && statuses.iter().all(|s| s.raw.is_none()) {
            continue;
        }
        out += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n");
        for s in statuses.iter().filter(|s| !raw_only || s.raw.is_some()) {
            out += &format!("{name}{{job=\"{}\"}} {}\n", s.job, f(s));
        }
    }
    out
}

/// Rewrites `STATE_DIR/snapveil.prom` from the status files of `jobs`.
///
/// # Errors
/// I/O errors writing the file.
pub fn write_prometheus(state_dir: &Path, jobs: &[String]) -> std::io::Result<()> {
    let st: Vec<RunStatus> = jobs.iter().filter_map(|j| load(state_dir, j)).collect();
    write_atomic(&state_dir.join("snapveil.prom"), prometheus(&st).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_file_names() {
        assert_eq!(tmp_pid(".20261124T010000Z.sha1.tmp-42"), Some(42));
        assert_eq!(tmp_pid(".x.json.tmp-"), None);
        assert_eq!(tmp_pid("x.json.tmp-42"), None);
        assert_eq!(tmp_pid("20261124T010000Z.json"), None);
    }

    #[test]
    fn failed_write_leaves_no_temp_file() {
        let d = tempfile::tempdir().unwrap();
        // The rename fails: the destination is a non-empty directory.
        let dest = d.path().join("dest");
        fs::create_dir_all(dest.join("x")).unwrap();
        write_atomic(&dest, b"data").unwrap_err();
        let names: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["dest"], "temp file left behind");
    }

    #[test]
    fn prometheus_lines() {
        let s = RunStatus {
            job: "home".into(),
            stamp: "20261124T010000Z".into(),
            result: RunResult::Success,
            started: "2026-11-24T01:00:00Z".into(),
            finished: "2026-11-24T01:00:10Z".into(),
            duration_s: 10.0,
            bytes_sent: 42,
            files_transferred: 1,
            consistent: true,
            generations: Some(3),
            error: None,
            raw: None,
        };
        let p = prometheus(std::slice::from_ref(&s));
        assert!(
            !p.contains("snapveil_raw_"),
            "no raw job, no raw metrics: {p}"
        );
        let raw = RunStatus {
            job: "db".into(),
            generations: None,
            raw: Some(RawStatus {
                last_snapshot: "tank/db@snapveil-db-20261124T010000Z".into(),
                chain_length: 4,
                restore_points: 9,
            }),
            ..s.clone()
        };
        let p2 = prometheus(&[s.clone(), raw]);
        assert!(
            p2.contains("snapveil_raw_chain_length{job=\"db\"} 4\n"),
            "{p2}"
        );
        assert!(p2.contains("snapveil_raw_restore_points{job=\"db\"} 9\n"));
        assert!(p2.contains("snapveil_last_run_bytes_sent{job=\"db\"} 42\n"));
        assert!(!p2.contains("snapveil_raw_chain_length{job=\"home\"}"));
        assert!(p.contains("snapveil_last_run_success{job=\"home\"} 1\n"));
        assert!(
            p.contains("snapveil_last_run_timestamp_seconds{job=\"home\"} 1795482010\n"),
            "{p}"
        );
        assert!(p.contains("snapveil_generations{job=\"home\"} 3\n"));
    }

    #[test]
    fn run_result_keeps_its_strings() {
        for (r, s) in [
            (RunResult::Success, "success"),
            (RunResult::Warning, "warning"),
            (RunResult::Failure, "failure"),
        ] {
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("{s:?}"));
            assert_eq!(
                serde_json::from_str::<RunResult>(&format!("{s:?}")).unwrap(),
                r
            );
            assert_eq!(r.to_string(), s);
            assert_eq!(format!("{r:<9}|"), format!("{s:<9}|"));
        }
        let mut st = load_example();
        st.result = RunResult::Warning;
        let json = serde_json::to_string(&st).unwrap();
        assert!(json.contains("\"result\":\"warning\""), "{json}");
        assert_eq!(
            prometheus(&[st]).lines().nth(2),
            Some("snapveil_last_run_success{job=\"home\"} 1")
        );
    }

    fn load_example() -> RunStatus {
        serde_json::from_str(
            r#"{"job":"home","stamp":"20261124T010000Z","result":"failure",
                "started":"2026-11-24T01:00:00Z","finished":"2026-11-24T01:00:10Z",
                "duration_s":10.0,"bytes_sent":42,"files_transferred":1,"consistent":true,
                "generations":3,"error":"boom"}"#,
        )
        .unwrap()
    }
}
