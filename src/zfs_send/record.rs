//! `streams/STAMP.json`: one raw run's restore point, and how stream files are named.

use super::Protection;
use serde::{Deserialize, Serialize};

/// A raw run's record. Written after its stream file and `.sha1` are complete.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamRecord {
    pub job: String,
    pub stamp: String,
    pub dataset: String,
    /// The snapshot sent, `snapveil-JOB-STAMP`.
    pub snapshot: String,
    /// Sent with `zfs send -R` (the dataset and its children).
    pub recursive: bool,
    /// The snapshot the increment starts from; `None` for a full stream.
    pub base: Option<String>,
    /// The record of that snapshot.
    pub base_stamp: Option<String>,
    /// The stream file in `streams/`.
    pub file: String,
    /// sha1 of the stream file as stored (ciphertext when age-wrapped).
    pub sha1: String,
    pub bytes: u64,
    /// `zfs send -w`: ZFS's own encryption, the key stays on the source.
    pub raw: bool,
    /// Wrapped in age by snapveil.
    pub age: bool,
}

impl StreamRecord {
    /// Parses `streams/NAME` and checks it can be trusted as a record of `job`: its name
    /// is its stamp, it names this job, and its stream file is a plain name there.
    ///
    /// # Errors
    /// Why not, for the error message.
    pub fn parse(data: &[u8], name: &str, job: &str) -> Result<StreamRecord, String> {
        let r: StreamRecord =
            serde_json::from_slice(data).map_err(|e| format!("not a stream record: {e}"))?;
        if name != format!("{}.json", r.stamp) {
            return Err(format!("its stamp {} is not its name", r.stamp));
        }
        if r.job != job {
            return Err(format!("a record of job {:?}, not of {job:?}", r.job));
        }
        let plain = !r.file.is_empty()
            && !r.file.starts_with('.')
            && !r.file.contains('/')
            && !r.file.ends_with(".json");
        if !plain {
            return Err(format!("stream file {:?} is not a plain name", r.file));
        }
        if r.sha1.len() != 40 || !r.sha1.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("sha1 {:?} is not a sha1", r.sha1));
        }
        if r.base.is_some() != r.base_stamp.is_some() {
            return Err("base and base_stamp must be given together".into());
        }
        Ok(r)
    }
}

/// `DATASET@SNAP.full.zfs` or `DATASET@SNAP.from-BASE.zfs`, with `/` in the dataset as
/// `+` (not allowed in ZFS names, so unambiguous), `.raw` before `.zfs` for `zfs send
/// -w` streams and `.age` after it when wrapped in age: what a file holds is in its name,
/// for whoever restores it with stock tools.
pub fn stream_name(dataset: &str, base: Option<&str>, snap: &str, p: Protection) -> String {
    let ds = dataset.replace('/', "+");
    let kind = match base {
        None => "full".to_string(),
        Some(b) => format!("from-{b}"),
    };
    format!(
        "{ds}@{snap}.{kind}{}.zfs{}",
        if p.raw { ".raw" } else { "" },
        if p.age { ".age" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> StreamRecord {
        StreamRecord {
            job: "j".into(),
            stamp: "20261130T010000Z".into(),
            dataset: "tank/data".into(),
            snapshot: "snapveil-j-20261130T010000Z".into(),
            recursive: false,
            base: None,
            base_stamp: None,
            file: "tank+data@snapveil-j-20261130T010000Z.full.zfs.age".into(),
            sha1: "0".repeat(40),
            bytes: 1,
            raw: false,
            age: true,
        }
    }

    #[test]
    fn names_say_what_the_file_holds() {
        let age = Protection {
            raw: false,
            age: true,
        };
        let raw = Protection {
            raw: true,
            age: false,
        };
        assert_eq!(
            stream_name("tank/data", None, "s1", age),
            "tank+data@s1.full.zfs.age"
        );
        assert_eq!(
            stream_name("tank/a/b", Some("s1"), "s2", raw),
            "tank+a+b@s2.from-s1.raw.zfs"
        );
    }

    #[test]
    fn a_record_is_trusted_only_under_its_own_name_and_job() {
        let r = rec();
        let data = serde_json::to_vec(&r).unwrap();
        assert_eq!(
            StreamRecord::parse(&data, "20261130T010000Z.json", "j").unwrap(),
            r
        );
        assert!(StreamRecord::parse(&data, "20261130T020000Z.json", "j")
            .unwrap_err()
            .contains("not its name"));
        assert!(StreamRecord::parse(&data, "20261130T010000Z.json", "k")
            .unwrap_err()
            .contains("job"));
        for bad in ["../x", ".hidden", "a/b", ""] {
            let mut r = rec();
            r.file = bad.into();
            let data = serde_json::to_vec(&r).unwrap();
            assert!(
                StreamRecord::parse(&data, "20261130T010000Z.json", "j").is_err(),
                "{bad}"
            );
        }
    }
}
