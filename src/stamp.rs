//! The name of a run: the UTC second it started, `YYYYMMDDTHHMMSSZ` (`20261124T013000Z`).
//! It names the run's snapshot (`snapveil-JOB-STAMP`), its generation, record and
//! manifests on the target, and orders them: stamps sort as their times do.
//!
//! One validator for every place that reads a name back: strict, a stamp must format
//! back to itself, so only names snapveil writes are ever taken for one.

use chrono::{DateTime, NaiveDateTime, Utc};
use std::fmt;

/// A valid stamp (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp(String);

impl Stamp {
    pub const FORMAT: &'static str = "%Y%m%dT%H%M%SZ";

    /// `None` for anything that is not exactly a stamp of a real UTC time.
    pub fn parse(s: &str) -> Option<Stamp> {
        if s.len() != 16 {
            return None;
        }
        let t = NaiveDateTime::parse_from_str(s, Self::FORMAT).ok()?;
        (t.format(Self::FORMAT).to_string() == s).then(|| Stamp(s.to_string()))
    }

    /// The stamp of `t`, to the second.
    pub fn at(t: DateTime<Utc>) -> Stamp {
        Stamp(t.format(Self::FORMAT).to_string())
    }

    /// The current second, by the system clock.
    pub fn now() -> Stamp {
        Stamp::at(Utc::now())
    }

    pub fn time(&self) -> DateTime<Utc> {
        NaiveDateTime::parse_from_str(&self.0, Self::FORMAT)
            .expect("a Stamp is valid")
            .and_utc()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Stamp {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_exact_stamps_of_real_times_parse() {
        let s = Stamp::parse("20261124T013000Z").unwrap();
        assert_eq!(s.time().to_rfc3339(), "2026-11-24T01:30:00+00:00");
        assert_eq!(Stamp::at(s.time()), s);
        for bad in [
            "20261124T013000",
            "20261124T013000Z ",
            "20261324T013000Z",
            "20260230T013000Z",
            "2026112-T013000Z",
            "+2026112T013000Z",
            "20261124t013000Z",
            "",
        ] {
            assert!(Stamp::parse(bad).is_none(), "{bad:?}");
        }
        assert!(Stamp::parse("20261124T013000Z") < Stamp::parse("20261124T013001Z"));
    }
}
