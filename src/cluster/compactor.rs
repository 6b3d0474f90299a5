//! Auto-compaction: the leader forgets old history, so the keyspace's memory and data file
//! stay bounded on a cluster that runs for months.
//!
//! Every write keeps its revision until a compaction forgets it, and eden keeps the retained
//! history's index in memory. `eden serve --auto-compaction-mode/--auto-compaction-retention`
//! take etcd's flags and meanings:
//!
//! - **periodic** (the default mode) keeps a time window. The retention is a duration (`30m`,
//!   `2h`, `90s`) or a whole number of hours (`1` = one hour, as etcd reads it). Every tenth
//!   of `min(retention, 1h)` the compactor notes the current revision; every time it checks
//!   it compacts to the newest revision it noted at least one retention ago.
//! - **revision** keeps the last N revisions: every five minutes it compacts to the current
//!   revision minus N.
//! - A retention of `0` turns it off.
//!
//! Only the leader proposes compactions, through Raft like the KV `Compact` call, so every
//! replica forgets the same history. Followers keep noting revisions, so a new leader carries
//! on where the old one stopped. A compaction that fails (no quorum, a new leader) is tried
//! again at the next check.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use eden_raft::RaftNode;
use eden_storage::{Command, CompactionRequest};

use crate::error::{Error, Result};

/// How often revision mode looks (etcd's interval).
pub const REVISION_CHECK: Duration = Duration::from_secs(300);
/// The shortest wait between checks, however short the retention.
const MIN_PERIOD: Duration = Duration::from_millis(100);
/// The longest wait between periodic checks.
const MAX_PERIOD: Duration = Duration::from_secs(3600);
/// The default: keep one hour of history.
pub const DEFAULT_RETENTION: &str = "1h";

/// What to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    Off,
    /// Keep this much time of history.
    Periodic(Duration),
    /// Keep this many revisions.
    Revision(i64),
}

impl Default for Policy {
    /// eden's default: keep one hour of history ([`DEFAULT_RETENTION`]).
    fn default() -> Policy {
        Policy::Periodic(Duration::from_secs(3600))
    }
}

impl Policy {
    /// Reads `--auto-compaction-mode` and `--auto-compaction-retention` as etcd does.
    pub fn parse(mode: &str, retention: &str) -> Result<Policy> {
        let retention = retention.trim();
        match mode {
            "periodic" => {
                let d = if let Ok(hours) = retention.parse::<u64>() {
                    Duration::from_secs(hours.saturating_mul(3600))
                } else {
                    parse_duration(retention).ok_or_else(|| {
                        Error::InvalidInput(format!(
                            "--auto-compaction-retention {retention:?}: periodic mode takes a \
                             duration such as 30m, 2h or 90s, or a whole number of hours \
                             (0 turns auto-compaction off)"
                        ))
                    })?
                };
                Ok(if d.is_zero() {
                    Policy::Off
                } else {
                    Policy::Periodic(d)
                })
            }
            "revision" => {
                let n = retention
                    .parse::<i64>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or_else(|| {
                        Error::InvalidInput(format!(
                            "--auto-compaction-retention {retention:?}: revision mode takes a \
                         whole number of revisions to keep (0 turns auto-compaction off)"
                        ))
                    })?;
                Ok(if n == 0 {
                    Policy::Off
                } else {
                    Policy::Revision(n)
                })
            }
            other => Err(Error::InvalidInput(format!(
                "--auto-compaction-mode {other:?}: use periodic (keep a time window) or \
                 revision (keep the last N revisions)"
            ))),
        }
    }

    /// How often the compactor looks.
    pub fn period(&self) -> Option<Duration> {
        match self {
            Policy::Off => None,
            Policy::Periodic(d) => Some(((*d).min(MAX_PERIOD) / 10).max(MIN_PERIOD)),
            Policy::Revision(_) => Some(REVISION_CHECK),
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Policy::Off => write!(f, "off"),
            Policy::Periodic(d) => write!(f, "keep {}s of history", d.as_secs_f64()),
            Policy::Revision(n) => write!(f, "keep the last {n} revisions"),
        }
    }
}

/// `90s`, `30m`, `2h`, `1h30m`, `500ms`: a sum of whole numbers with units.
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60)?),
            "h" => Duration::from_secs(n.checked_mul(3600)?),
            _ => return None,
        };
        total = total.checked_add(unit)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// Decides, from what it has seen, which revision to compact to. Pure: the caller supplies
/// the clock and the store's figures.
#[derive(Debug)]
pub struct Planner {
    policy: Policy,
    /// (when, revision) notes, oldest first.
    notes: VecDeque<(Instant, i64)>,
}

impl Planner {
    pub fn new(policy: Policy) -> Planner {
        Planner {
            policy,
            notes: VecDeque::new(),
        }
    }

    /// Notes the current `revision` at `now` and returns the revision to compact to, if any.
    /// `compacted` is the store's compacted revision.
    pub fn check(&mut self, now: Instant, revision: i64, compacted: i64) -> Option<i64> {
        let target = match self.policy {
            Policy::Off => None,
            Policy::Revision(keep) => Some(revision - keep),
            Policy::Periodic(window) => {
                self.notes.push_back((now, revision));
                let old_enough = |at: Instant| now.checked_sub(window).is_some_and(|c| at <= c);
                // The front becomes the newest note at least one window old; older ones are
                // not needed again.
                while self.notes.get(1).is_some_and(|&(at, _)| old_enough(at)) {
                    self.notes.pop_front();
                }
                self.notes
                    .front()
                    .filter(|&&(at, _)| old_enough(at))
                    .map(|&(_, rev)| rev)
            }
        };
        target.filter(|&t| t > compacted && t > 0)
    }
}

/// Runs `policy` on this node until the task is dropped.
pub async fn run(node: Arc<RaftNode>, policy: Policy) {
    let Some(period) = policy.period() else {
        return;
    };
    tracing::info!("auto-compaction: {policy}, checking every {period:?}");
    let mut planner = Planner::new(policy);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let store = node.store();
        let target = planner.check(Instant::now(), store.revision(), store.compact_revision());
        let Some(revision) = target else { continue };
        if !node.is_leader() {
            continue;
        }
        let cmd = Command::Compact(CompactionRequest {
            revision,
            physical: false,
        });
        match node.write(cmd).await {
            Ok(_) => tracing::info!("auto-compaction: compacted history up to revision {revision}"),
            // Another node compacted further meanwhile: nothing to do.
            Err(e) if store.compact_revision() >= revision => {
                tracing::debug!("auto-compaction to {revision}: {e}")
            }
            Err(e) => tracing::warn!(
                "auto-compaction to revision {revision} failed (tried again at the next check): {e}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_is_read_as_etcd_reads_it() {
        let p = |m, r| Policy::parse(m, r).unwrap();
        assert_eq!(
            p("periodic", "1"),
            Policy::Periodic(Duration::from_secs(3600))
        );
        assert_eq!(
            p("periodic", "30m"),
            Policy::Periodic(Duration::from_secs(1800))
        );
        assert_eq!(
            p("periodic", "1h30m"),
            Policy::Periodic(Duration::from_secs(5400))
        );
        assert_eq!(
            p("periodic", "500ms"),
            Policy::Periodic(Duration::from_millis(500))
        );
        assert_eq!(p("periodic", "0"), Policy::Off);
        assert_eq!(p("periodic", "0s"), Policy::Off);
        assert_eq!(p("revision", "1000"), Policy::Revision(1000));
        assert_eq!(p("revision", "0"), Policy::Off);
        for (m, r) in [
            ("periodic", "ten minutes"),
            ("periodic", "5x"),
            ("periodic", ""),
            ("periodic", "h"),
            ("revision", "1h"),
            ("revision", "-3"),
            ("hourly", "1"),
        ] {
            let e = Policy::parse(m, r).unwrap_err().to_string();
            assert!(e.contains("--auto-compaction"), "{m} {r}: {e}");
        }
    }

    #[test]
    fn periodic_checks_every_tenth_of_the_window_from_100ms_up_to_six_minutes() {
        let period = |r| Policy::parse("periodic", r).unwrap().period().unwrap();
        assert_eq!(period("10s"), Duration::from_secs(1));
        assert_eq!(period("1ms"), Duration::from_millis(100));
        assert_eq!(period("1h"), Duration::from_secs(360));
        assert_eq!(period("72h"), Duration::from_secs(360));
        assert_eq!(Policy::Revision(5).period(), Some(Duration::from_secs(300)));
        assert_eq!(Policy::Off.period(), None);
    }

    #[test]
    fn periodic_compacts_to_the_revision_seen_one_window_ago() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = Planner::new(Policy::Periodic(s(10)));
        // Revisions seen every second: 100, 110, 120, ...
        let mut out = Vec::new();
        for i in 0..25u64 {
            out.push(p.check(t0 + s(i), 100 + 10 * i as i64, 0));
        }
        // Nothing is a whole window old before second 10; then the note from ten seconds
        // before is the target each time.
        assert!(out[..10].iter().all(|o| o.is_none()), "{out:?}");
        for (i, o) in out.iter().enumerate().skip(10) {
            assert_eq!(*o, Some(100 + 10 * (i as i64 - 10)), "second {i}");
        }
        // Already compacted that far: nothing to do.
        assert_eq!(p.check(t0 + s(25), 400, 1000), None);
    }

    #[test]
    fn periodic_keeps_the_old_target_while_nothing_newer_is_old_enough() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = Planner::new(Policy::Periodic(s(10)));
        assert_eq!(p.check(t0, 50, 0), None);
        // A long quiet gap (a leader change, a paused process): the old note still counts.
        assert_eq!(p.check(t0 + s(30), 90, 0), Some(50));
        assert_eq!(p.check(t0 + s(31), 95, 0), Some(50));
        assert_eq!(p.check(t0 + s(41), 99, 0), Some(95));
    }

    #[test]
    fn revision_mode_keeps_the_last_n() {
        let t0 = Instant::now();
        let mut p = Planner::new(Policy::Revision(100));
        assert_eq!(p.check(t0, 50, 0), None);
        assert_eq!(p.check(t0, 100, 0), None);
        assert_eq!(p.check(t0, 350, 0), Some(250));
        assert_eq!(p.check(t0, 350, 250), None);
        assert_eq!(Planner::new(Policy::Off).check(t0, 1_000_000, 0), None);
    }
}
