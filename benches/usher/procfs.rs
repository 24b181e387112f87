//! What a process tree costs, read from /proc: resident memory and CPU.

use std::fs;

/// Clock ticks per second of /proc/PID/stat's times (USER_HZ; 100 on
/// every Linux this runs on).
const TICKS_PER_SECOND: f64 = 100.0;

/// `pid` and all its descendants that exist now.
pub fn tree(pid: u32) -> Vec<u32> {
    let parents: Vec<(u32, u32)> = all_pids()
        .into_iter()
        .filter_map(|p| Some((p, stat_fields(p)?.ppid)))
        .collect();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        found.extend(
            parents
                .iter()
                .filter(|(_, ppid)| *ppid == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    found
}

/// Resident memory of the trees under `roots`, in KiB (VmRSS summed:
/// pages shared between processes count once per process).
pub fn rss_kib(roots: &[u32]) -> u64 {
    roots
        .iter()
        .flat_map(|root| tree(*root))
        .filter_map(vm_rss_kib)
        .sum()
}

/// CPU seconds (user + system) used so far by the trees under `roots`,
/// counting children that have exited and were waited for.
pub fn cpu_seconds(roots: &[u32]) -> f64 {
    let ticks: u64 = roots
        .iter()
        .flat_map(|root| tree(*root))
        .filter_map(stat_fields)
        .map(|s| s.utime + s.stime + s.cutime + s.cstime)
        .sum();
    ticks as f64 / TICKS_PER_SECOND
}

/// Whether any process's command line contains `needle` (Dovecot names
/// its processes after the instance).
pub fn any_cmdline_contains(needle: &str) -> bool {
    all_pids().into_iter().any(|pid| {
        fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
    })
}

fn all_pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The fields of /proc/PID/stat this module needs.
struct Stat {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

fn stat_fields(pid: u32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: split after
    // its closing parenthesis. Fields then start at field 3 (state).
    let rest = &text[text.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i - 3)?.parse::<u64>().ok();
    Some(Stat {
        ppid: num(4)? as u32,
        utime: num(14)?,
        stime: num(15)?,
        cutime: num(16)?,
        cstime: num(17)?,
    })
}
