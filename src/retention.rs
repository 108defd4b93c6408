//! Retention policy: which restore points to keep, and why. Pure: the restore points and
//! the time zone are passed in, nothing is read from the clock or the target. What
//! deleting a restore point means for the `--backup-dir` generations on the target is
//! [`crate::prune`]'s business, not this module's.
//!
//! The semantics are restic's `forget` (`internal/restic/snapshot_policy.go`), so that
//! users' expectations carry over (see docs/retention.md and issue 5):
//! - restore points are walked newest first;
//! - each count rule (`last`, `hourly`, `daily`, `weekly`, `monthly`, `yearly`)
//!   independently keeps the newest restore point in each of its N most recent periods
//!   that contain one: a point is kept when its period differs from the period of the
//!   last point *this rule* kept, and the rule still has budget. Empty periods do not
//!   count, so a count is never a time window (an outage longer than the window still
//!   leaves N dailies);
//! - periods are taken in the timestamp's local time ([`LocalTime`], injectable so that
//!   tests can simulate a DST change); weeks are ISO weeks keyed with the ISO year;
//! - N = -1 is unlimited, N = 0 turns the rule off;
//! - the oldest restore point is kept if a rule still has budget when the list ends;
//! - `within D` keeps everything newer than the newest restore point minus D;
//!   `within_<period> D` keeps the newest point per period among those (plus the oldest,
//!   as above). The reference is the newest restore point, never "now", so a stopped
//!   backup does not age its history away;
//! - the newest restore point is always kept.

use chrono::{DateTime, Datelike, Local, NaiveDateTime, Timelike, Utc};
use std::fmt;

/// A calendar span like restic's `--keep-within` argument: `14d`, `2w`, `1y2m3d`, `36h`.
/// Units: `y` years, `m` months, `w` weeks, `d` days, `h` hours. Years, months and days
/// are calendar arithmetic on the local time of the newest restore point (1m back from
/// 31 March is 28/29 February); hours are absolute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Span {
    pub years: u32,
    pub months: u32,
    pub weeks: u32,
    pub days: u32,
    pub hours: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpanError {
    #[error("duration {input:?}: empty; expected e.g. 14d, 2w, 1y2m3d, 36h")]
    Empty { input: String },
    #[error(
        "duration {input:?}: {reason}; expected e.g. 14d, 2w, 1y2m3d, 36h (units y, m, w, d, h)"
    )]
    Invalid { input: String, reason: String },
}

impl std::str::FromStr for Span {
    type Err = SpanError;

    fn from_str(input: &str) -> Result<Self, SpanError> {
        let s = input.trim();
        if s.is_empty() {
            return Err(SpanError::Empty {
                input: input.into(),
            });
        }
        let bad = |reason: &str| SpanError::Invalid {
            input: input.into(),
            reason: reason.into(),
        };
        let mut span = Span::default();
        let mut seen = String::new();
        let mut num = String::new();
        for c in s.chars() {
            if c.is_ascii_digit() {
                num.push(c);
                continue;
            }
            if num.is_empty() {
                return Err(bad(&format!("{c:?} has no number before it")));
            }
            let n: u32 = num.parse().map_err(|_| bad("number too large"))?;
            num.clear();
            if seen.contains(c) {
                return Err(bad(&format!("unit {c:?} given twice")));
            }
            seen.push(c);
            match c {
                'y' => span.years = n,
                'm' => span.months = n,
                'w' => span.weeks = n,
                'd' => span.days = n,
                'h' => span.hours = n,
                _ => return Err(bad(&format!("unknown unit {c:?}"))),
            }
        }
        if !num.is_empty() {
            return Err(bad("number without a unit at the end"));
        }
        Ok(span)
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_zero() {
            return write!(f, "0h");
        }
        for (n, u) in [
            (self.years, 'y'),
            (self.months, 'm'),
            (self.weeks, 'w'),
            (self.days, 'd'),
            (self.hours, 'h'),
        ] {
            if n > 0 {
                write!(f, "{n}{u}")?;
            }
        }
        Ok(())
    }
}

impl Span {
    pub fn is_zero(&self) -> bool {
        *self == Span::default()
    }

    /// The instant `self` before `latest`, with the calendar part done on `latest`'s
    /// local time. Saturates at the earliest representable time for absurd spans.
    fn before(
        &self,
        latest: DateTime<Utc>,
        local: &dyn Fn(DateTime<Utc>) -> NaiveDateTime,
    ) -> DateTime<Utc> {
        let wall = local(latest);
        let months = self.years.saturating_mul(12).saturating_add(self.months);
        let days = u64::from(self.weeks) * 7 + u64::from(self.days);
        let back = wall
            .checked_sub_months(chrono::Months::new(months))
            .and_then(|t| t.checked_sub_days(chrono::Days::new(days)));
        let Some(back) = back else {
            return DateTime::<Utc>::MIN_UTC;
        };
        // The wall time `back` as an instant: first guess with latest's offset, then
        // re-read with the offset in force at that guess (a DST change in between moves
        // the instant by an hour, like Go's AddDate in restic). In a DST gap the
        // first guess stands.
        let guess = latest.checked_sub_signed(wall - back);
        let at_back = guess.and_then(|g| {
            let offset = local(g) - g.naive_utc();
            let t = (back - offset).and_utc();
            (local(t) == back).then_some(t).or(Some(g))
        });
        at_back
            .and_then(|t| t.checked_sub_signed(chrono::Duration::hours(i64::from(self.hours))))
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }
}

/// What the user asked to keep. Counts: -1 unlimited, 0 off. Spans: `None` or zero off.
/// The job config converts into this (see [`Policy::from_parts`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub last: i64,
    pub hourly: i64,
    pub daily: i64,
    pub weekly: i64,
    pub monthly: i64,
    pub yearly: i64,
    pub within: Option<Span>,
    pub within_hourly: Option<Span>,
    pub within_daily: Option<Span>,
    pub within_weekly: Option<Span>,
    pub within_monthly: Option<Span>,
    pub within_yearly: Option<Span>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("retention: {field} = {value}: must be -1 (unlimited), 0 (off) or a positive count")]
    Count { field: &'static str, value: i64 },
    #[error("retention: {field}: {source}")]
    Span {
        field: &'static str,
        #[source]
        source: SpanError,
    },
    #[error(
        "retention policy keeps nothing: set at least one of last, hourly, daily, weekly, \
         monthly, yearly (a count, -1 = unlimited) or within* (a duration like 14d)"
    )]
    KeepsNothing,
}

/// The count rules, in the order restic evaluates them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Rule {
    pub const ALL: [Rule; 6] = [
        Rule::Last,
        Rule::Hourly,
        Rule::Daily,
        Rule::Weekly,
        Rule::Monthly,
        Rule::Yearly,
    ];

    fn name(self) -> &'static str {
        match self {
            Rule::Last => "last",
            Rule::Hourly => "hourly",
            Rule::Daily => "daily",
            Rule::Weekly => "weekly",
            Rule::Monthly => "monthly",
            Rule::Yearly => "yearly",
        }
    }

    /// The period key of a local time; `nr` makes every point its own period for `last`.
    fn key(self, t: NaiveDateTime, nr: usize) -> i64 {
        let (y, m, d, h) = (
            i64::from(t.year()),
            i64::from(t.month()),
            i64::from(t.day()),
            i64::from(t.hour()),
        );
        match self {
            Rule::Last => nr as i64,
            Rule::Hourly => ((y * 100 + m) * 100 + d) * 100 + h,
            Rule::Daily => (y * 100 + m) * 100 + d,
            Rule::Weekly => {
                let w = t.iso_week();
                i64::from(w.year()) * 100 + i64::from(w.week())
            }
            Rule::Monthly => y * 100 + m,
            Rule::Yearly => y,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a restore point is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A count rule kept it; `oldest` when only because the list ended with budget left.
    Count { rule: Rule, oldest: bool },
    /// `within`: newer than the newest restore point minus the span.
    Within(Span),
    /// `within_<rule>`: newest of its period among the points within the span.
    WithinPeriod {
        rule: Rule,
        span: Span,
        oldest: bool,
    },
    /// The newest restore point, kept regardless of the policy.
    Newest,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let old = |o: bool| if o { " (oldest)" } else { "" };
        match self {
            Reason::Count { rule, oldest } => write!(f, "{rule}{}", old(*oldest)),
            Reason::Within(s) => write!(f, "within {s}"),
            Reason::WithinPeriod { rule, span, oldest } => {
                write!(f, "within-{rule} {span}{}", old(*oldest))
            }
            Reason::Newest => write!(f, "newest"),
        }
    }
}

/// One restore point: a successful run, named by its stamp, at `time` (UTC).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestorePoint {
    pub stamp: String,
    pub time: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub stamp: String,
    pub time: DateTime<Utc>,
    pub keep: bool,
    pub reasons: Vec<Reason>,
}

/// Maps an instant to the wall-clock time in which periods are counted.
pub type LocalTime<'a> = &'a dyn Fn(DateTime<Utc>) -> NaiveDateTime;

/// The system's local time zone (what a user reading `date` expects).
pub fn system_local(t: DateTime<Utc>) -> NaiveDateTime {
    t.with_timezone(&Local).naive_local()
}

/// UTC wall clock, for servers that run in UTC and for tests.
pub fn utc(t: DateTime<Utc>) -> NaiveDateTime {
    t.naive_utc()
}

impl Policy {
    /// Builds a policy from config values, parsing the `within*` durations.
    /// `within` is `[within, within_hourly, within_daily, within_weekly, within_monthly,
    /// within_yearly]`, each an optional duration string.
    ///
    /// # Errors
    /// A bad count or duration (naming the field), or a policy that keeps nothing.
    pub fn from_parts(counts: [i64; 6], within: [Option<&str>; 6]) -> Result<Policy, PolicyError> {
        const FIELDS: [&str; 6] = [
            "within",
            "within_hourly",
            "within_daily",
            "within_weekly",
            "within_monthly",
            "within_yearly",
        ];
        let mut spans = [None; 6];
        for (i, w) in within.iter().enumerate() {
            if let Some(w) = w {
                spans[i] = Some(w.parse::<Span>().map_err(|source| PolicyError::Span {
                    field: FIELDS[i],
                    source,
                })?);
            }
        }
        let [last, hourly, daily, weekly, monthly, yearly] = counts;
        let [within, within_hourly, within_daily, within_weekly, within_monthly, within_yearly] =
            spans;
        let p = Policy {
            last,
            hourly,
            daily,
            weekly,
            monthly,
            yearly,
            within,
            within_hourly,
            within_daily,
            within_weekly,
            within_monthly,
            within_yearly,
        };
        p.validate()?;
        Ok(p)
    }

    fn count(&self, rule: Rule) -> i64 {
        match rule {
            Rule::Last => self.last,
            Rule::Hourly => self.hourly,
            Rule::Daily => self.daily,
            Rule::Weekly => self.weekly,
            Rule::Monthly => self.monthly,
            Rule::Yearly => self.yearly,
        }
    }

    /// `within` for `Last`, `within_<rule>` otherwise; zero spans are off.
    fn within_for(&self, rule: Rule) -> Option<Span> {
        let s = match rule {
            Rule::Last => self.within,
            Rule::Hourly => self.within_hourly,
            Rule::Daily => self.within_daily,
            Rule::Weekly => self.within_weekly,
            Rule::Monthly => self.within_monthly,
            Rule::Yearly => self.within_yearly,
        };
        s.filter(|s| !s.is_zero())
    }

    /// Checks the counts and that the policy keeps something.
    ///
    /// # Errors
    /// [`PolicyError::Count`] for a count below -1, [`PolicyError::KeepsNothing`] when
    /// every rule is off: such a policy would delete every restore point but the newest,
    /// which is never what a user meant.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for rule in Rule::ALL {
            let value = self.count(rule);
            if value < -1 {
                return Err(PolicyError::Count {
                    field: rule.name(),
                    value,
                });
            }
        }
        let any_count = Rule::ALL.iter().any(|r| self.count(*r) != 0);
        let any_within = Rule::ALL.iter().any(|r| self.within_for(*r).is_some());
        if any_count || any_within {
            Ok(())
        } else {
            Err(PolicyError::KeepsNothing)
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for rule in Rule::ALL {
            match self.count(rule) {
                0 => {}
                -1 => parts.push(format!("{rule}=all")),
                n => parts.push(format!("{rule}={n}")),
            }
        }
        for rule in Rule::ALL {
            if let Some(s) = self.within_for(rule) {
                match rule {
                    Rule::Last => parts.push(format!("within={s}")),
                    r => parts.push(format!("within_{r}={s}")),
                }
            }
        }
        f.write_str(&parts.join(" "))
    }
}

/// Decides for every restore point whether to keep it and why. Returns the decisions
/// newest first (ties in time broken by stamp, newest stamp first).
///
/// Follows restic exactly (see the module doc); in addition the newest point is always
/// kept, with [`Reason::Newest`] when no rule kept it (only possible for a policy that
/// fails [`Policy::validate`]).
pub fn plan(points: &[RestorePoint], policy: &Policy, local: LocalTime<'_>) -> Vec<Decision> {
    let mut sorted: Vec<&RestorePoint> = points.iter().collect();
    sorted.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| b.stamp.cmp(&a.stamp)));
    let Some(latest) = sorted.first().map(|p| p.time) else {
        return Vec::new();
    };

    struct Counter {
        rule: Rule,
        left: i64,
        last_key: Option<i64>,
    }
    struct WithinRule {
        rule: Rule,
        span: Span,
        cutoff: DateTime<Utc>,
        last_key: Option<i64>,
    }
    let mut counters: Vec<Counter> = Rule::ALL
        .iter()
        .filter(|r| policy.count(**r) != 0)
        .map(|&rule| Counter {
            rule,
            left: policy.count(rule),
            last_key: None,
        })
        .collect();
    let mut withins: Vec<WithinRule> = Rule::ALL
        .iter()
        .filter_map(|&rule| {
            policy.within_for(rule).map(|span| WithinRule {
                rule,
                span,
                cutoff: span.before(latest, local),
                last_key: None,
            })
        })
        .collect();

    let n = sorted.len();
    let mut out = Vec::with_capacity(n);
    for (nr, p) in sorted.into_iter().enumerate() {
        let wall = local(p.time);
        let is_oldest = nr + 1 == n;
        let mut reasons = Vec::new();
        for c in &mut counters {
            if c.left == 0 {
                continue;
            }
            let key = c.rule.key(wall, nr);
            let new_period = c.last_key != Some(key);
            if new_period || is_oldest {
                c.last_key = Some(key);
                if c.left > 0 {
                    c.left -= 1;
                }
                reasons.push(Reason::Count {
                    rule: c.rule,
                    oldest: !new_period,
                });
            }
        }
        for w in &mut withins {
            if p.time <= w.cutoff {
                continue;
            }
            if w.rule == Rule::Last {
                reasons.push(Reason::Within(w.span));
                continue;
            }
            let key = w.rule.key(wall, nr);
            let new_period = w.last_key != Some(key);
            if new_period || is_oldest {
                w.last_key = Some(key);
                reasons.push(Reason::WithinPeriod {
                    rule: w.rule,
                    span: w.span,
                    oldest: !new_period,
                });
            }
        }
        if nr == 0 && reasons.is_empty() {
            reasons.push(Reason::Newest);
        }
        out.push(Decision {
            stamp: p.stamp.clone(),
            time: p.time,
            keep: !reasons.is_empty(),
            reasons,
        });
    }
    out
}

/// The time of a stamp ([`crate::stamp::Stamp`]'s strict validator).
pub(crate) fn parse_stamp(s: &str) -> Option<DateTime<Utc>> {
    crate::stamp::Stamp::parse(s).map(|s| s.time())
}

#[cfg(test)]
pub(crate) fn format_stamp(t: DateTime<Utc>) -> String {
    crate::stamp::Stamp::at(t).to_string()
}

#[cfg(test)]
mod tests;
