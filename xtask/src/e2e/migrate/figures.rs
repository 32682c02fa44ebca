//! The figures of a migration run: QEMU's per-migration numbers, one boot's report, and the
//! run's summary line.

use std::path::Path;

use super::{read_text, MIGRATIONS};
use crate::e2e::json::Json;

/// One completed migration, as QEMU's `query-migrate` reported it.
#[derive(Debug, Clone, Default)]
pub(super) struct Migration {
    /// `downtime`, ms: the guest was stopped this long.
    pub(super) downtime_ms: u64,
    /// `total-time`, ms.
    pub(super) total_ms: u64,
    /// `ram.transferred`, bytes.
    pub(super) transferred: u64,
    /// `ram.dirty-sync-count`: how many times QEMU synced the dirty log (iterations).
    pub(super) dirty_syncs: u64,
    /// `ram.postcopy-requests`: pages the destination asked the source for after the
    /// switch to postcopy (the guest's faults and the backend's).
    pub(super) postcopy_requests: u64,
    /// `ram.postcopy-bytes`: bytes sent after the switch to postcopy.
    pub(super) postcopy_bytes: u64,
    /// Guest rounds (each fills a region of its page cache by the device's DMA) finished on
    /// the source between `migrate` and `completed`.
    pub(super) rounds_during: u64,
}

impl Migration {
    /// The figures of a completed migration from `query-migrate`'s return value (a figure
    /// QEMU did not report is 0).
    pub(super) fn from_query_migrate(info: &Json) -> Migration {
        let number = |value: Option<&Json>| value.and_then(Json::as_u64).unwrap_or(0);
        let ram = |key: &str| number(info.get("ram").and_then(|ram| ram.get(key)));
        Migration {
            downtime_ms: number(info.get("downtime")),
            total_ms: number(info.get("total-time")),
            transferred: ram("transferred"),
            dirty_syncs: ram("dirty-sync-count"),
            postcopy_requests: ram("postcopy-requests"),
            postcopy_bytes: ram("postcopy-bytes"),
            rounds_during: 0,
        }
    }
}

/// How one boot went.
#[derive(Debug, Default)]
pub(super) struct Report {
    pub(super) failure: Option<String>,
    pub(super) migrations: Vec<Migration>,
    /// Rounds the guest completed.
    pub(super) rounds: u64,
    /// From the first QEMU's start to the last one's exit.
    pub(super) seconds: f64,
    /// The backends' "pages of read data written while logging" (vu_blk only).
    pub(super) logged_pages: u64,
    pub(super) unlogged_reads: u64,
    /// Faults of the backends on missing pages that the destination QEMUs resolved (postcopy,
    /// from QEMU's `vhost_user_postcopy_fault_handler` trace events).
    pub(super) backend_faults: u64,
}

/// QEMU's trace event for a fault on a backend's userfaultfd that it resolves: one line per
/// fault the backend's own threads took on a page not yet migrated.
pub(super) const BACKEND_FAULT_EVENT: &str = "vhost_user_postcopy_fault_handler_found";

/// The number before `tag` in the backend's summary line (vu_blk).
pub(super) fn summary_count(log: &str, tag: &str) -> u64 {
    log.lines()
        .filter_map(|line| line.split_once(tag))
        .filter_map(|(before, _)| before.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

/// What a run of boots produced.
#[derive(Debug, Default)]
pub(super) struct Summary {
    pub(super) boots: u32,
    pub(super) passes: u32,
    /// Failures the guest found in the data it read (`VU-E2E-FAIL migrate data:`).
    pub(super) data_failures: u32,
    pub(super) migrations: Vec<Migration>,
    pub(super) logged_pages: u64,
    pub(super) unlogged_reads: u64,
    pub(super) backend_faults: u64,
    pub(super) seconds: Vec<f64>,
}

pub(super) fn percentile(values: &[u64], pct: usize) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted
        .get((sorted.len().saturating_sub(1)) * pct / 100)
        .copied()
        .unwrap_or(0)
}

impl Summary {
    pub(super) fn line(&self, name: &str) -> String {
        let downtimes: Vec<u64> = self.migrations.iter().map(|m| m.downtime_ms).collect();
        let totals: Vec<u64> = self.migrations.iter().map(|m| m.total_ms).collect();
        let syncs: Vec<u64> = self.migrations.iter().map(|m| m.dirty_syncs).collect();
        let rounds: Vec<u64> = self.migrations.iter().map(|m| m.rounds_during).collect();
        let mib: u64 = self.migrations.iter().map(|m| m.transferred).sum::<u64>() >> 20;
        let requests: u64 = self.migrations.iter().map(|m| m.postcopy_requests).sum();
        let after_switch: u64 = self
            .migrations
            .iter()
            .map(|m| m.postcopy_bytes)
            .sum::<u64>()
            >> 20;
        let mut line = format!(
            "{name}: {}/{} boots passed ({} data mismatches found by the guest); {} migrations; \
             downtime ms median {} max {}; total ms median {} max {}; dirty syncs median {}; \
             guest rounds during a migration min {} median {}; {mib} MiB sent; {} pages of \
             read data written while logging, {} reads not logged",
            self.passes,
            self.boots,
            self.data_failures,
            self.migrations.len(),
            percentile(&downtimes, 50),
            percentile(&downtimes, 100),
            percentile(&totals, 50),
            percentile(&totals, 100),
            percentile(&syncs, 50),
            percentile(&rounds, 0),
            percentile(&rounds, 50),
            self.logged_pages,
            self.unlogged_reads,
        );
        if requests > 0 || self.backend_faults > 0 {
            line.push_str(&format!(
                "; postcopy: {after_switch} MiB sent after the switch, {requests} pages \
                 requested from the source, {} backend faults resolved",
                self.backend_faults
            ));
        }
        line
    }
}

/// How many faults on the backends' userfaultfds the QEMUs of the boot in `dir` resolved
/// (their logs carry [`BACKEND_FAULT_EVENT`] lines in postcopy runs).
pub(super) fn backend_faults(dir: &Path) -> u64 {
    (0..=MIGRATIONS)
        .map(|index| {
            let log = read_text(&dir.join(format!("qemu-{index}.log")));
            log.lines()
                .filter(|line| line.contains(BACKEND_FAULT_EVENT))
                .count() as u64
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_summaries_are_added_up() {
        let log = "[INFO] served 9 requests: ...; 120 pages of read data written while \
                   logging, 3 reads not logged\n[INFO] served 2 requests: ...; 5 pages of read \
                   data written while logging, 0 reads not logged\n";
        assert_eq!(summary_count(log, "pages of read data"), 125);
        assert_eq!(summary_count(log, "reads not logged"), 3);
    }

    #[test]
    fn query_migrate_figures_are_read() {
        let info = Json::parse(
            r#"{"status": "completed", "setup-time": 2, "downtime": 17, "total-time": 1834, "ram": {"transferred": 9876543, "dirty-sync-count": 4, "postcopy-requests": 12, "postcopy-bytes": 4096}}"#,
        )
        .unwrap();
        let migration = Migration::from_query_migrate(&info);
        assert_eq!(migration.downtime_ms, 17);
        assert_eq!(migration.total_ms, 1834);
        assert_eq!(migration.transferred, 9876543);
        assert_eq!(migration.dirty_syncs, 4);
        assert_eq!(migration.postcopy_requests, 12);
        assert_eq!(migration.postcopy_bytes, 4096);
        let none = Migration::from_query_migrate(&Json::parse(r#"{"status": "active"}"#).unwrap());
        assert_eq!(none.downtime_ms, 0);
        assert_eq!(none.transferred, 0);
    }

    #[test]
    fn percentiles_of_a_few_values() {
        assert_eq!(percentile(&[30, 10, 20], 50), 20);
        assert_eq!(percentile(&[30, 10, 20], 100), 30);
        assert_eq!(percentile(&[], 50), 0);
    }
}
