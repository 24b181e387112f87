//! Medians over repetitions, ratios to the direct connection, the table and
//! the targets.

use std::fmt;

use crate::load::Figures;
use crate::world::{Hash, Way};

/// One run: a case, one way, one repetition.
pub struct Run {
    pub hash: Hash,
    pub case: &'static str,
    pub way: Way,
    pub rep: usize,
    /// Sessions asked for (idle).
    pub wanted: usize,
    pub figures: Figures,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "run hash={} case={} way={} rep={} {} cpu_s_per_1000_ops={:.3} cpu_s_per_gb={:.3}",
            self.hash.name(),
            self.case,
            self.way.name(),
            self.rep,
            self.figures,
            per_1000_ops(&self.figures),
            per_gb(&self.figures),
        )
    }
}

/// CPU seconds of the watched processes per 1,000 operations.
fn per_1000_ops(f: &Figures) -> f64 {
    if f.ops == 0 {
        return 0.0;
    }
    f.cpu_s / f.ops as f64 * 1000.0
}

/// CPU seconds of the backends per 1,000 operations.
fn backend_per_1000_ops(f: &Figures) -> f64 {
    if f.ops == 0 {
        return 0.0;
    }
    f.backend_cpu_s / f.ops as f64 * 1000.0
}

/// CPU seconds of the watched processes per GB (10^9 bytes) relayed.
fn per_gb(f: &Figures) -> f64 {
    if f.bytes == 0 {
        return 0.0;
    }
    f.cpu_s / (f.bytes as f64 / 1e9)
}

/// Whether every run did what it was asked: operations done, no errors,
/// and every idle session held. Says what failed on stderr.
/// How many of `runs` failed (no operation, an error, or too few idle
/// sessions held); each is reported on stderr.
pub fn failed_runs(runs: &[Run]) -> usize {
    let mut failed = 0;
    for r in runs {
        let f = &r.figures;
        let short = f.scenario == "idle" && f.ops < r.wanted as u64;
        if f.ops == 0 || f.errors > 0 || short {
            eprintln!(
                "FAILED: {} {} {} rep {}: {} ops, {} errors",
                r.hash.name(),
                r.case,
                r.way.name(),
                r.rep,
                f.ops,
                f.errors
            );
            failed += 1;
        }
    }
    failed
}

/// One row of the table: a figure of one case.
struct Row {
    hash: Option<Hash>,
    case: &'static str,
    label: &'static str,
    value: fn(&Figures) -> f64,
}

const ROWS: &[Row] = &[
    Row {
        hash: Some(Hash::Cheap),
        case: "login",
        label: "login, {SSHA512}: logins/s",
        value: Figures::rate,
    },
    Row {
        hash: Some(Hash::Cheap),
        case: "login",
        label: "login, {SSHA512}: p50 ms",
        value: |f| f.p50_ms,
    },
    Row {
        hash: Some(Hash::Cheap),
        case: "login",
        label: "login, {SSHA512}: p99 ms",
        value: |f| f.p99_ms,
    },
    Row {
        hash: Some(Hash::Cheap),
        case: "login",
        label: "login, {SSHA512}: CPU-s / 1,000 logins",
        value: per_1000_ops,
    },
    Row {
        hash: Some(Hash::Cheap),
        case: "login",
        label: "login, {SSHA512}: backends' CPU-s / 1,000 logins",
        value: backend_per_1000_ops,
    },
    Row {
        hash: Some(Hash::Argon2id),
        case: "login",
        label: "login, argon2id: logins/s",
        value: Figures::rate,
    },
    Row {
        hash: Some(Hash::Argon2id),
        case: "login",
        label: "login, argon2id: p50 ms",
        value: |f| f.p50_ms,
    },
    Row {
        hash: Some(Hash::Argon2id),
        case: "login",
        label: "login, argon2id: p99 ms",
        value: |f| f.p99_ms,
    },
    Row {
        hash: Some(Hash::Argon2id),
        case: "login",
        label: "login, argon2id: CPU-s / 1,000 logins",
        value: per_1000_ops,
    },
    Row {
        hash: Some(Hash::Argon2id),
        case: "login",
        label: "login, argon2id: backends' CPU-s / 1,000 logins",
        value: backend_per_1000_ops,
    },
    Row {
        hash: None,
        case: "fetch",
        label: "fetch 20 MB: MB/s",
        value: Figures::rate,
    },
    Row {
        hash: None,
        case: "fetch",
        label: "fetch 20 MB: CPU-s / GB",
        value: per_gb,
    },
    Row {
        hash: None,
        case: "submit",
        label: "submit 100 KB: msgs/s",
        value: Figures::rate,
    },
    Row {
        hash: None,
        case: "submit",
        label: "submit 100 KB: CPU-s / GB",
        value: per_gb,
    },
    Row {
        hash: None,
        case: "idle",
        label: "idle IMAP: sessions held",
        value: |f| f.ops as f64,
    },
    Row {
        hash: None,
        case: "idle",
        label: "idle IMAP: KiB / session",
        value: |f| f.kib_per_session,
    },
    Row {
        hash: None,
        case: "idle-tls",
        label: "idle IMAPS: sessions held",
        value: |f| f.ops as f64,
    },
    Row {
        hash: None,
        case: "idle-tls",
        label: "idle IMAPS: KiB / session",
        value: |f| f.kib_per_session,
    },
];

/// The median of `value` over the runs of `case` (with `hash`, if given)
/// by `way`; `None` if there were none.
fn median(
    runs: &[Run],
    hash: Option<Hash>,
    case: &str,
    way: Way,
    value: fn(&Figures) -> f64,
) -> Option<f64> {
    let mut values: Vec<f64> = runs
        .iter()
        .filter(|r| r.case == case && r.way == way && hash.is_none_or(|h| h == r.hash))
        .map(|r| value(&r.figures))
        .collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

/// The medians of every row, as a Markdown table with ratios to direct.
pub fn table(runs: &[Run]) -> String {
    let mut out = String::from(
        "| figure (median of repetitions) | direct | usher | usher ÷ direct \
         | Dovecot proxy | Dovecot proxy ÷ direct |\n| --- | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for row in ROWS {
        let cell = |way| median(runs, row.hash, row.case, way, row.value);
        let Some(direct) = cell(Way::Direct) else {
            continue;
        };
        let (usher, proxy) = (cell(Way::Usher), cell(Way::DovecotProxy));
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            row.label,
            number(Some(direct)),
            number(usher),
            ratio(usher, direct),
            number(proxy),
            ratio(proxy, direct),
        ));
    }
    out
}

fn number(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.3}"),
    }
}

fn ratio(v: Option<f64>, direct: f64) -> String {
    match v {
        Some(v) if direct > 0.0 => format!("{:.2}×", v / direct),
        _ => "–".into(),
    }
}

/// One target of the issue, checked against usher's medians.
struct Target {
    what: &'static str,
    hash: Option<Hash>,
    case: &'static str,
    value: fn(&Figures) -> f64,
    /// Compared as a ratio to direct rather than as an absolute figure.
    relative: bool,
    at_least: bool,
    bound: f64,
}

const TARGETS: &[Target] = &[
    Target {
        what: "fetch MB/s ≥ 0.97× direct",
        hash: None,
        case: "fetch",
        value: Figures::rate,
        relative: true,
        at_least: true,
        bound: 0.97,
    },
    Target {
        what: "fetch ≤ 0.3 CPU-s of usher per GB relayed",
        hash: None,
        case: "fetch",
        value: per_gb,
        relative: false,
        at_least: false,
        bound: 0.3,
    },
    Target {
        what: "logins/s ≥ 0.95× direct with a cheap hash",
        hash: Some(Hash::Cheap),
        case: "login",
        value: Figures::rate,
        relative: true,
        at_least: true,
        bound: 0.95,
    },
    Target {
        what: "≤ 0.25 CPU-s of usher per 1,000 logins (cheap hash)",
        hash: Some(Hash::Cheap),
        case: "login",
        value: per_1000_ops,
        relative: false,
        at_least: false,
        bound: 0.25,
    },
    Target {
        what: "submission msgs/s ≥ 0.95× direct",
        hash: None,
        case: "submit",
        value: Figures::rate,
        relative: true,
        at_least: true,
        bound: 0.95,
    },
    Target {
        what: "≤ 8 KiB of usher per idle cleartext IMAP session",
        hash: None,
        case: "idle",
        value: |f| f.kib_per_session,
        relative: false,
        at_least: false,
        bound: 8.0,
    },
];

/// Each target with usher's figure and whether it is met; the idle count
/// must reach `sessions`.
pub fn targets(runs: &[Run], sessions: usize) -> String {
    let mut out = String::new();
    for t in TARGETS {
        let Some(usher) = median(runs, t.hash, t.case, Way::Usher, t.value) else {
            continue;
        };
        let direct = median(runs, t.hash, t.case, Way::Direct, t.value).unwrap_or(0.0);
        let figure = match (t.relative, direct > 0.0) {
            (true, true) => usher / direct,
            (true, false) => 0.0,
            (false, _) => usher,
        };
        let met = if t.at_least {
            figure >= t.bound
        } else {
            figure <= t.bound
        };
        let shown = if t.relative {
            format!("{figure:.3}×")
        } else {
            format!("{figure:.3}")
        };
        out.push_str(&format!(
            "target {}: usher {shown}: {}\n",
            t.what,
            verdict(met)
        ));
    }
    if let Some(held) = median(runs, None, "idle", Way::Usher, |f| f.ops as f64) {
        let met = held as usize >= sessions;
        out.push_str(&format!(
            "target {sessions} idle sessions in one usher process: held {held:.0}: {}\n",
            verdict(met)
        ));
    }
    if let Some(kib) = median(runs, None, "idle-tls", Way::Usher, |f| f.kib_per_session) {
        out.push_str(&format!(
            "measured: {kib:.2} KiB of usher per idle TLS session\n"
        ));
    }
    out
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

/// The machine, for the report: cores, CPU model, kernel, memory.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    format!(
        "machine: {cores} cores, {model}, Linux {}, {:.1} GiB memory",
        kernel.trim(),
        mem_kib as f64 / 1024.0 / 1024.0
    )
}

/// The load averages now, to see whether other work shared the machine.
pub fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let fields: Vec<&str> = text.split_whitespace().take(3).collect();
    format!("load average: {}", fields.join(" "))
}
