//! What the harness reads about the host: the load average, a process's threads and their CPU
//! time (from /proc), and a UTC timestamp for names of kept directories.

use std::path::Path;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Clock ticks per second of the times in /proc/*/stat: `USER_HZ`, 100 on every Linux
/// architecture this runs on (it is part of the kernel's ABI, independent of `CONFIG_HZ`).
const USER_HZ: f64 = 100.0;

/// The 1, 5 and 15 minute load averages from /proc/loadavg, as `2.07 0.96 0.38`.
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| parse_loadavg(&text))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn parse_loadavg(text: &str) -> Option<String> {
    let fields: Vec<&str> = text.split_whitespace().take(3).collect();
    (fields.len() == 3 && fields.iter().all(|f| f.parse::<f64>().is_ok())).then(|| fields.join(" "))
}

/// The fields of /proc/<pid>/task/<tid>/stat the dump shows.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ThreadStat {
    pub(crate) name: String,
    /// R running, S sleeping, D uninterruptible, T stopped, t traced, Z zombie.
    pub(crate) state: char,
    /// User plus system CPU time.
    pub(crate) cpu_seconds: f64,
}

/// Parses a stat line. The name is in parentheses and may itself hold spaces and `)`, so the
/// fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<ThreadStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // After the name: state is field 3 of proc(5), utime 14, stime 15.
    let state = fields.first()?.chars().next()?;
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(ThreadStat {
        name,
        state,
        cpu_seconds: (utime + stime) / USER_HZ,
    })
}

/// The CPU time `pid` has used so far, all threads together.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|text| parse_stat(&text))
        .map(|stat| stat.cpu_seconds)
}

/// One line per thread of `pid`: tid, name, state, CPU seconds, and the kernel function it
/// waits in (`wchan`).
pub(crate) fn threads(pid: u32) -> String {
    let dir = Path::new("/proc").join(pid.to_string()).join("task");
    let mut tids: Vec<u32> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
            .collect(),
        Err(err) => return format!("(cannot list {}: {err})\n", dir.display()),
    };
    tids.sort_unstable();
    let mut text = format!(
        "{:>8}  {:<16} {:<5} {:>8}  wchan\n",
        "tid", "name", "state", "cpu s"
    );
    for tid in tids {
        let task = dir.join(tid.to_string());
        let stat = std::fs::read_to_string(task.join("stat"))
            .ok()
            .and_then(|text| parse_stat(&text));
        let wchan = std::fs::read_to_string(task.join("wchan")).unwrap_or_default();
        match stat {
            Some(stat) => text.push_str(&format!(
                "{tid:>8}  {:<16} {:<5} {:>8.2}  {}\n",
                stat.name,
                stat.state,
                stat.cpu_seconds,
                wchan.trim()
            )),
            None => text.push_str(&format!("{tid:>8}  (gone)\n")),
        }
    }
    text
}

/// The kernel stacks of `pid`'s threads (/proc/<pid>/task/*/stack, readable by root only),
/// for when gdb is not there.
pub(crate) fn kernel_stacks(pid: u32) -> String {
    let dir = Path::new("/proc").join(pid.to_string()).join("task");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return format!("(cannot list {})\n", dir.display());
    };
    let mut text = String::new();
    for entry in entries.flatten() {
        let stack = std::fs::read_to_string(entry.path().join("stack"))
            .unwrap_or_else(|err| format!("(cannot read: {err})\n"));
        text.push_str(&format!(
            "thread {}:\n{stack}",
            entry.file_name().to_string_lossy()
        ));
    }
    text
}

/// Waits for `child` to exit, at most `timeout`; on timeout it is killed (by its PID) and
/// `None` returned.
pub(crate) fn wait_bounded(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if start.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Now in UTC as `20261207T001502Z`.
pub(crate) fn utc_stamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    stamp_of(secs)
}

/// `secs` after the epoch as `YYYYMMDDTHHMMSSZ` (days to civil date: the proleptic Gregorian
/// calendar in 400-year eras).
pub(crate) fn stamp_of(secs: u64) -> String {
    let days = secs / 86_400;
    let rest = secs % 86_400;
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loadavg_keeps_the_three_averages() {
        assert_eq!(
            parse_loadavg("2.07 0.96 0.38 3/412 12345\n").as_deref(),
            Some("2.07 0.96 0.38")
        );
        assert_eq!(parse_loadavg("garbage"), None);
    }

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        let line = "4242 (qemu (vcpu) 1) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    250 50 0 0 20 0 3 0 12345 1000 100";
        assert_eq!(
            parse_stat(line),
            Some(ThreadStat {
                name: "qemu (vcpu) 1".to_owned(),
                state: 'S',
                cpu_seconds: 3.0
            })
        );
        assert_eq!(parse_stat("4242 (x) S 1"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let pid = std::process::id();
        assert!(cpu_seconds(pid).is_some());
        assert!(threads(pid).lines().count() >= 2);
    }

    #[test]
    fn stamps_are_utc_calendar_dates() {
        assert_eq!(stamp_of(0), "19700101T000000Z");
        assert_eq!(stamp_of(951_782_400), "20000229T000000Z");
        assert_eq!(stamp_of(1_796_690_102), "20261208T003502Z");
    }
}
