//! What a process spent, from /proc: CPU time, context switches, resident memory.

use std::time::Duration;

/// A process's resident memory.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |k| k * 1024)
}

/// CPU time and context switches a proxy spent: its process, its threads and its child
/// processes (nginx's workers), from /proc.
#[derive(Debug, Default, Clone, Copy)]
pub struct Usage {
    pub cpu: Duration,
    /// Of `cpu`, the time in user space (the rest is the kernel's, on the process's behalf).
    pub user: Duration,
    pub switches: u64,
}

impl Usage {
    pub fn of(pid: u32) -> Self {
        // SAFETY: sysconf reads a constant of the system; no memory is touched.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let mut usage = Self::default();
        for process in std::iter::once(pid).chain(children(pid)) {
            let stat = proc_stat(process).unwrap_or_default();
            // utime and stime: the 14th and 15th fields.
            let time = |field| {
                let ticks = stat_field(&stat, field).unwrap_or(0);
                Duration::from_secs_f64(ticks as f64 / ticks_per_second)
            };
            let user = time(14);
            usage.user += user;
            usage.cpu += user + time(15);
            let tasks = std::fs::read_dir(format!("/proc/{process}/task"))
                .into_iter()
                .flatten();
            for task in tasks.flatten() {
                let status =
                    std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
                usage.switches += status
                    .lines()
                    .filter(|l| l.contains("ctxt_switches:"))
                    .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum::<u64>();
            }
        }
        usage
    }

    /// What `pids` spent, summed.
    pub fn of_all(pids: &[u32]) -> Self {
        let mut usage = Self::default();
        for &pid in pids {
            usage.add(Self::of(pid));
        }
        usage
    }

    pub fn since(self, before: Self) -> Self {
        Self {
            cpu: self.cpu.saturating_sub(before.cpu),
            user: self.user.saturating_sub(before.user),
            switches: self.switches.saturating_sub(before.switches),
        }
    }

    pub fn add(&mut self, other: Self) {
        self.cpu += other.cpu;
        self.user += other.user;
        self.switches += other.switches;
    }
}

/// The processes whose parent (the 4th field) is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            proc_stat(child).and_then(|stat| stat_field(&stat, 4)) == Some(u64::from(pid))
        })
        .collect()
}

fn proc_stat(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

/// The numeric field `field` (counted from 1, as proc(5) does) of a `/proc/{pid}/stat` line.
fn stat_field(stat: &str, field: usize) -> Option<u64> {
    // The command (field 2) may hold spaces and parentheses: fields 3 on follow its last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace()
        .nth(field.checked_sub(3)?)?
        .parse()
        .ok()
}
