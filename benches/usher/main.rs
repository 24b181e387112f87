//! usher beside a direct connection to Dovecot and beside Dovecot's own
//! proxy mode (issue 5).
//!
//! `cargo bench --bench usher` starts two real Dovecot backends, usher and
//! a Dovecot proxy in front of them ([`world`]), runs every scenario of the
//! load generator ([`load`]) three ways, three times each, and prints one
//! line of figures per run, then a table of medians with each figure as a
//! ratio to the direct connection, then the targets of the issue, met or
//! missed. BENCHMARKS.md holds the results and explains the figures.
//!
//! Run by `cargo test` (no `--bench` argument) it is a smoke test: every
//! scenario, three ways, tiny counts, and a non-zero exit unless every run
//! completed operations without errors.
//!
//! Layout:
//! - `world.rs`: the backends, usher and the Dovecot proxy;
//! - `load.rs`: the scenarios' clients and their figures;
//! - `procfs.rs`: CPU and resident memory of process trees;
//! - `sink.rs`: the SMTP server the backends relay submitted mail to;
//! - `report.rs`: medians, ratios, the table and the targets.

#[path = "../../tests/common/mod.rs"]
mod common;
mod load;
mod procfs;
mod report;
mod sink;
mod world;

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::bail;

use load::{Figures, Params, Scenario};
use report::Run;
use world::{Hash, Protocol, Size, Way, World};

/// One row group of the report: a scenario over one protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Case {
    pub name: &'static str,
    pub scenario: Scenario,
    pub protocol: Protocol,
}

const LOGIN: Case = Case {
    name: "login",
    scenario: Scenario::Login,
    protocol: Protocol::Imap,
};
const FETCH: Case = Case {
    name: "fetch",
    scenario: Scenario::Fetch,
    protocol: Protocol::Imap,
};
const SUBMIT: Case = Case {
    name: "submit",
    scenario: Scenario::Submit,
    protocol: Protocol::Submission,
};
const IDLE: Case = Case {
    name: "idle",
    scenario: Scenario::Idle,
    protocol: Protocol::Imap,
};
const IDLE_TLS: Case = Case {
    name: "idle-tls",
    scenario: Scenario::Idle,
    protocol: Protocol::Imaps,
};
const CASES: [Case; 5] = [LOGIN, FETCH, SUBMIT, IDLE, IDLE_TLS];

/// Counts and times of one invocation.
#[derive(Debug, Clone)]
struct Plan {
    /// Full comparison (`--bench`) or smoke test.
    full: bool,
    cases: Vec<Case>,
    hashes: Vec<Hash>,
    reps: usize,
    seconds: Duration,
    users: usize,
    login_clients: usize,
    submit_clients: usize,
    fetch_bytes: usize,
    submit_bytes: usize,
    idle_sessions: usize,
    idle_tls_sessions: usize,
}

impl Plan {
    /// The full comparison of the issue.
    fn full() -> Plan {
        Plan {
            full: true,
            cases: CASES.to_vec(),
            hashes: vec![Hash::Cheap, Hash::Argon2id],
            reps: 3,
            seconds: Duration::from_secs(5),
            users: 1000,
            login_clients: 16,
            submit_clients: 4,
            fetch_bytes: 20 * 1024 * 1024,
            submit_bytes: 100 * 1024,
            // usher holds two descriptors per session and the hard limit
            // is 20,000; a hundred are left for listeners, the store, logs.
            idle_sessions: 9_900,
            idle_tls_sessions: 9_900,
        }
    }

    /// What `cargo test` runs: everything, tiny, well under a minute.
    fn smoke() -> Plan {
        Plan {
            full: false,
            hashes: vec![Hash::Cheap],
            reps: 1,
            seconds: Duration::from_millis(500),
            users: 20,
            login_clients: 2,
            submit_clients: 2,
            fetch_bytes: 1024 * 1024,
            submit_bytes: 10 * 1024,
            idle_sessions: 10,
            idle_tls_sessions: 5,
            ..Plan::full()
        }
    }

    /// Reads the command line. Unknown arguments are ignored: `cargo test`
    /// passes its own (`--test-threads 4`, filters) to every target.
    fn from_args(args: &[String]) -> anyhow::Result<Plan> {
        let full = args.iter().any(|a| a == "--bench");
        let mut plan = if full { Plan::full() } else { Plan::smoke() };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = || it.next().cloned().unwrap_or_default();
            match arg.as_str() {
                "--scenario" => plan.cases = parse_cases(&value())?,
                "--hash" => plan.hashes = parse_hashes(&value())?,
                "--reps" => plan.reps = value().parse()?,
                "--seconds" => plan.seconds = Duration::from_secs_f64(value().parse()?),
                "--sessions" => plan.idle_sessions = value().parse()?,
                "--tls-sessions" => plan.idle_tls_sessions = value().parse()?,
                "--quick" => {
                    plan.reps = 1;
                    plan.seconds = Duration::from_secs(2);
                    plan.idle_sessions = plan.idle_sessions.min(1000);
                    plan.idle_tls_sessions = plan.idle_tls_sessions.min(1000);
                }
                _ => {}
            }
        }
        Ok(plan)
    }

    /// The cases run with `hash`: a hash is only checked at login, so the
    /// scenarios that log in once per client run with the cheap one only.
    fn cases_for(&self, hash: Hash) -> Vec<Case> {
        match hash {
            Hash::Cheap => self.cases.clone(),
            Hash::Argon2id => self.cases.iter().copied().filter(|c| *c == LOGIN).collect(),
        }
    }

    fn params(&self, case: Case, world: &World, way: Way) -> Params {
        let sessions = match case {
            IDLE_TLS => self.idle_tls_sessions,
            _ => self.idle_sessions,
        };
        Params {
            scenario: case.scenario,
            target: world.target(way, case.protocol),
            users: self.users,
            duration: self.seconds,
            concurrency: match case.scenario {
                Scenario::Submit => self.submit_clients,
                _ => self.login_clients,
            },
            sessions,
            message_bytes: self.submit_bytes,
            watch: world.watched(way),
            backends: world.watched(Way::Direct),
        }
    }
}

fn parse_cases(list: &str) -> anyhow::Result<Vec<Case>> {
    list.split(',')
        .map(|name| match CASES.iter().find(|c| c.name == name) {
            Some(c) => Ok(*c),
            None => bail!("unknown scenario {name:?} (login, fetch, submit, idle, idle-tls)"),
        })
        .collect()
}

fn parse_hashes(list: &str) -> anyhow::Result<Vec<Hash>> {
    list.split(',')
        .map(|name| match name {
            "cheap" | "ssha512" => Ok(Hash::Cheap),
            "argon2id" => Ok(Hash::Argon2id),
            _ => bail!("unknown hash {name:?} (cheap, argon2id)"),
        })
        .collect()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("usher bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the plan; false if a run failed (smoke test) or did nothing.
fn run(args: &[String]) -> anyhow::Result<bool> {
    let plan = Plan::from_args(args)?;
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    println!("# {}", report::machine());
    println!("# {}", report::load_average());
    let mut runs = Vec::new();
    for &hash in &plan.hashes {
        runs.extend(run_hash(&rt, &plan, hash)?);
    }
    println!(
        "# {} runs in {:.0} s",
        runs.len(),
        started.elapsed().as_secs_f64()
    );
    println!("# {}", report::load_average());
    let failed = report::failed_runs(&runs);
    let healthy = !runs.is_empty() && failed == 0;
    if !plan.full {
        // The closing line a test runner would print.
        println!("smoke: {} passed, {failed} failed", runs.len() - failed);
    }
    if plan.full {
        println!();
        print!("{}", report::table(&runs));
        println!();
        print!("{}", report::targets(&runs, plan.idle_sessions));
    }
    Ok(healthy)
}

/// Every case of `plan` for `hash`, each way, `plan.reps` times.
fn run_hash(rt: &tokio::runtime::Runtime, plan: &Plan, hash: Hash) -> anyhow::Result<Vec<Run>> {
    let cases = plan.cases_for(hash);
    let size = Size {
        users: plan.users,
        sessions: if plan.full { plan.idle_sessions } else { 0 },
    };
    let mut world = World::start(rt, hash, &size)?;
    if cases.contains(&FETCH) {
        let direct = world.target(Way::Direct, Protocol::Imap);
        rt.block_on(load::append_large(&direct, plan.fetch_bytes))?;
    }
    let mut runs = Vec::new();
    for rep in 1..=plan.reps {
        for &case in &cases {
            // The ways take turns within a repetition, so that a slow
            // moment of the machine does not fall on one way only.
            for way in Way::ALL {
                if case.scenario == Scenario::Idle {
                    world.refresh(way)?;
                }
                let params = plan.params(case, &world, way);
                let figures = rt.block_on(load::run(&params)).unwrap_or_else(|e| {
                    eprintln!("{} {} {}: {e:#}", hash.name(), case.name, way.name());
                    Figures {
                        errors: 1,
                        ..Figures::default()
                    }
                });
                let run = Run {
                    hash,
                    case: case.name,
                    way,
                    rep,
                    wanted: params.sessions,
                    figures,
                };
                println!("{run}");
                runs.push(run);
            }
        }
    }
    // Dovecot acknowledges a message only once the relay took it: every
    // message the clients saw accepted must have reached the sink.
    let submitted: u64 = runs
        .iter()
        .filter(|r| r.case == SUBMIT.name)
        .map(|r| r.figures.ops)
        .sum();
    let relayed = world.sink.accepted.load(Ordering::Relaxed);
    if relayed < submitted {
        bail!("{submitted} messages accepted, but only {relayed} reached the sink");
    }
    Ok(runs)
}

/// Raises this process's soft limit on open files to the hard limit: it
/// holds one descriptor per idle session.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
