//! `canaryctl`: talk to a running canary-agent over its control socket.
#![expect(
    unused_crate_dependencies,
    reason = "a thin binary over the canary_agent library, which uses the rest of the package's dependencies"
)]

use std::{
    io::{BufRead, BufReader, IsTerminal, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use canary_agent::{
    control::{ErrorCode, MAX_RESPONSE, Request, Response},
    status::{Explanation, HistoryReport, StatusReport},
    units::Weight,
};
use clap::{Parser, Subcommand};

/// Drive canary rollouts on this node: show each service's cohorts and
/// verdicts, set the canary weight, promote or roll back.
///
/// In a fleet (the agent's config has [fleet]), every command acts on the
/// whole fleet: it is written to etcd first (compare-and-swap) and every
/// node applies it within milliseconds; status adds the fleet (etcd, the
/// leader, one row per node). With etcd unreachable, rollback still works
/// on this node alone (published when etcd answers); other commands are
/// refused, nothing changes.
///
/// Talks to canary-agent over its control socket (root, the agent's user,
/// or a member of its control_group). Exit status: 0 on success, 1 when the
/// agent refused or could not be reached (the message says why), 2 on a
/// usage error.
#[expect(
    clippy::doc_markdown,
    reason = "doc comments here are the --help text, where backticks would show literally"
)]
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    /// The agent's control socket.
    #[arg(
        long,
        env = "CANARY_SOCKET",
        default_value = "/run/canary/control.sock",
        global = true
    )]
    socket: PathBuf,

    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Clone, Debug)]
enum Cmd {
    /// Show every service (or one): state, release, weights, observed canary
    /// share, per-cohort connections, failures and first-byte p50/p99, and
    /// the last verdict; in a fleet, also one row per node (weight in
    /// force, connections and failures at the step, last verdict, data
    /// plane attached, seconds since it was last heard from).
    Status {
        /// Only this service.
        service: Option<String>,
        /// Print the agent's JSON answer (for scripts).
        #[arg(long)]
        json: bool,
        /// Refresh in place until Ctrl-C.
        #[arg(long)]
        watch: bool,
        /// Refresh interval with --watch, in seconds.
        #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
        interval: f64,
    },
    /// Set the canary weight by hand: "5%", "0.25%" or "2500ppm". Persists
    /// across agent restarts until `resume`.
    SetWeight {
        /// The service.
        service: String,
        /// The new weight.
        weight: String,
    },
    /// Hold a progressing rollout at its step (the judge still guards it;
    /// `resume` goes on).
    Pause {
        /// The service.
        service: String,
    },
    /// Go on: a paused plan continues at its step; after a rollback,
    /// promotion or manual weight, a plan starts over and a service without
    /// one returns to its configured weight. Clears a rollback and resets
    /// the breaker.
    Resume {
        /// The service.
        service: String,
    },
    /// Pass a manual gate: enter the step awaiting approval.
    Approve {
        /// The service.
        service: String,
    },
    /// Send every new connection to canary. Persists until `resume`.
    Promote {
        /// The service.
        service: String,
    },
    /// Send no new connection to canary (existing ones drain). Persists
    /// until `resume`.
    Rollback {
        /// The service.
        service: String,
    },
    /// Make the agent re-read its config file (as SIGHUP); a bad file is
    /// rejected and the running config stays.
    Reload,
    /// List the service's state changes: when, from, to, the weight after,
    /// who decided (canaryctl, the judge, the breaker, the config, the
    /// fleet) and why. Kept across restarts (the latest 200).
    History {
        /// The service.
        service: String,
        /// Print the agent's JSON answer (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Explain why the service is where it is: its state and weight, where
    /// it is in its plan, what the step waits for (hold, connections, a
    /// judgement, an approval), the last change and the last verdicts.
    Explain {
        /// The service.
        service: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let request = match request(&cli.command) {
        Ok(request) => request,
        Err(msg) => {
            eprintln!("canaryctl: {msg}");
            return ExitCode::FAILURE;
        }
    };
    let result = match &cli.command {
        Cmd::Status {
            json,
            watch: true,
            interval,
            ..
        } => watch(&cli.socket, &request, *json, *interval),
        Cmd::Status { json, .. } => {
            call(&cli.socket, &request).and_then(|v| print_status(&v, *json))
        }
        Cmd::History { json, .. } => {
            call(&cli.socket, &request).and_then(|v| print_history(&v, *json))
        }
        Cmd::Explain { .. } => call(&cli.socket, &request).and_then(|v| {
            let e: Explanation =
                serde_json::from_value(v).map_err(|e| format!("unexpected answer: {e}"))?;
            for line in e.lines {
                println!("{line}");
            }
            Ok(())
        }),
        _ => call(&cli.socket, &request).map(|v| match serde_json::from_value::<StatusReport>(v) {
            Ok(report) => print!("{}", table(&report)),
            Err(_) => println!("ok"),
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("canaryctl: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// The protocol request for a command line. A weight is checked here, as
/// the agent would check it, because the request carries it typed.
fn request(cmd: &Cmd) -> Result<Request, String> {
    Ok(match cmd.clone() {
        Cmd::Status { service, .. } => Request::Status { service },
        Cmd::SetWeight { service, weight } => Request::SetWeight {
            service,
            // Refused with the agent's words and code, as if it had answered.
            weight: Weight::parse_argument(&weight)
                .map_err(|e| format!("{e} ({})", ErrorCode::BadArgument))?,
        },
        Cmd::Pause { service } => Request::Pause { service },
        Cmd::Resume { service } => Request::Resume { service },
        Cmd::Approve { service } => Request::Approve { service },
        Cmd::Promote { service } => Request::Promote { service },
        Cmd::Rollback { service } => Request::Rollback { service },
        Cmd::Reload => Request::Reload,
        Cmd::History { service, .. } => Request::History { service },
        Cmd::Explain { service } => Request::Explain { service },
    })
}

/// The `history` answer as a table (or its JSON).
fn print_history(value: &serde_json::Value, json: bool) -> Result<(), String> {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).map_err(|e| e.to_string())?
        );
        return Ok(());
    }
    let h: HistoryReport =
        serde_json::from_value(value.clone()).map_err(|e| format!("unexpected answer: {e}"))?;
    if h.changes.is_empty() {
        println!("{}: no state change recorded", h.service);
        return Ok(());
    }
    println!(
        "{:<20} {:<18} {:<18} {:<8} {:<14} WHY",
        "WHEN (UTC)", "FROM", "TO", "WEIGHT", "BY"
    );
    for c in &h.changes {
        println!(
            "{:<20} {:<18} {:<18} {:<8} {:<14} {}",
            utc(c.at_unix),
            c.from,
            c.to,
            c.weight,
            c.by,
            c.detail
        );
    }
    Ok(())
}

/// `2026-11-29 16:34:48` from Unix seconds (UTC, civil calendar).
fn utc(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    // Howard Hinnant's days-to-civil algorithm.
    #[expect(clippy::cast_possible_wrap, reason = "days since 1970 fit")]
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Sends one request; the result, or a message saying what went wrong.
fn call(socket: &Path, request: &Request) -> Result<serde_json::Value, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => format!(
            "no agent at {}: is canary-agent running? (set --socket or CANARY_SOCKET)",
            socket.display()
        ),
        std::io::ErrorKind::PermissionDenied => format!(
            "permission denied on {}: run as root or as a member of the agent's control_group",
            socket.display()
        ),
        _ => format!("cannot connect to {}: {e}", socket.display()),
    })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut line = request.to_line().map_err(|e| e.to_string())?;
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("sending to the agent: {e}"))?;
    let mut reply = Vec::new();
    BufReader::new(stream)
        .take(MAX_RESPONSE as u64)
        .read_until(b'\n', &mut reply)
        .map_err(|e| format!("reading the agent's answer: {e}"))?;
    if reply.is_empty() {
        return Err("the agent closed the connection without answering".to_string());
    }
    let response: Response = serde_json::from_slice(&reply)
        .map_err(|e| format!("the agent's answer is not a response: {e}"))?;
    response
        .into_result()
        .map_err(|err| format!("{} ({})", err.message, err.code))
}

fn print_status(value: &serde_json::Value, json: bool) -> Result<(), String> {
    print!("{}", status_text(value, json)?);
    Ok(())
}

/// The status answer as printed: the table, or the JSON.
fn status_text(value: &serde_json::Value, json: bool) -> Result<String, String> {
    if json {
        return serde_json::to_string_pretty(value)
            .map(|t| t + "\n")
            .map_err(|e| e.to_string());
    }
    let report: StatusReport = serde_json::from_value(value.clone())
        .map_err(|e| format!("unexpected status answer: {e}"))?;
    Ok(table(&report))
}

fn watch(socket: &Path, request: &Request, json: bool, interval: f64) -> Result<(), String> {
    let interval = Duration::from_secs_f64(interval.clamp(0.1, 3600.0));
    let tty = std::io::stdout().is_terminal();
    loop {
        let value = call(socket, request)?;
        if tty {
            // Home, each line drawn over the last frame's (cleared to its
            // end), then the rest of the screen cleared: no flicker.
            let text = status_text(&value, json)?.replace('\n', "\x1b[K\n");
            print!("\x1b[H{text}\x1b[J");
        } else {
            print_status(&value, json)?;
        }
        std::io::stdout().flush().map_err(|e| e.to_string())?;
        std::thread::sleep(interval);
    }
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v < 10.0 => format!("{v:.2}ms"),
        Some(v) => format!("{v:.1}ms"),
        None => "-".to_string(),
    }
}

/// The human view of a status report.
fn table(report: &StatusReport) -> String {
    let mut out = format!(
        "{:<16} {:<24} {:<16} {:<9} {:<7} {:>9} {:>7} {:>7} {:>8} {:>9} {:>9}\n",
        "SERVICE",
        "STATE",
        "WEIGHT",
        "OBSERVED",
        "COHORT",
        "CONNS",
        "ACTIVE",
        "FAILED",
        "FAIL%",
        "P50 FB",
        "P99 FB"
    );
    for s in &report.services {
        let weight = if s.configured_weight == s.effective_weight {
            s.effective_weight.clone()
        } else {
            format!("{} (cfg {})", s.effective_weight, s.configured_weight)
        };
        let observed = s
            .observed_canary_share
            .map_or_else(|| "-".into(), |v| format!("{:.2}%", v * 100.0));
        for (i, c) in s.cohorts.iter().enumerate() {
            let (name, state, weight, observed) = if i == 0 {
                (
                    s.name.as_str(),
                    s.state.as_str(),
                    weight.as_str(),
                    observed.as_str(),
                )
            } else {
                ("", "", "", "")
            };
            out.push_str(&format!(
                "{name:<16} {state:<24} {weight:<16} {observed:<9} {:<7} {:>9} {:>7} {:>7} {:>7.2}% {:>9} {:>9}\n",
                c.cohort,
                c.connections,
                c.active,
                c.failed,
                c.failure_ratio * 100.0,
                ms(c.first_byte_p50_ms),
                ms(c.first_byte_p99_ms),
            ));
        }
        if !s.release.is_empty() {
            out.push_str(&format!("{:<16} release: {}\n", "", s.release));
        }
        if s.mode == "shadow" {
            out.push_str(&format!(
                "{:<16} mode: shadow (decisions are reported, not enforced)\n",
                ""
            ));
        }
        if let Some(p) = &s.plan {
            out.push_str(&format!("{:<16} {}\n", "", progress(p)));
        }
        if let Some(v) = &s.last_verdict {
            out.push_str(&format!("{:<16} last verdict: {v}\n", ""));
        }
        for c in &s.checks {
            out.push_str(&format!("{:<16} {c}\n", ""));
        }
    }
    if let Some(f) = &report.fleet {
        out.push_str(&fleet_table(f));
    }
    out
}

/// `plan [■■□□□] step 2/5 (1% → 5% → 25% → 50% → 100%) · 40s in step · next: …`
fn progress(p: &canary_agent::status::PlanProgress) -> String {
    let bar: String = (1..=p.steps)
        .map(|i| if i <= p.step { '■' } else { '□' })
        .collect();
    let weights: Vec<String> = p
        .weights
        .iter()
        .enumerate()
        .map(|(i, w)| {
            if i + 1 == p.step as usize {
                format!("[{w}]")
            } else {
                w.clone()
            }
        })
        .collect();
    let time = p
        .in_step_secs
        .map(|s| format!(" · {} in step", duration(s)))
        .unwrap_or_default();
    format!(
        "plan [{bar}] step {}/{} ({}){time} · next: {}",
        p.step,
        p.steps,
        weights.join(" → "),
        p.next
    )
}

/// `1h02m`, `3m05s`, `42s`.
fn duration(secs: u64) -> String {
    match secs {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// The fleet part of the status: etcd, the leader, one row per node.
fn fleet_table(f: &canary_agent::status::FleetStatus) -> String {
    let role = if f.this_node_leads {
        "leader"
    } else {
        "follower"
    };
    let mut out = format!(
        "\nFLEET (this node: {}, {role}; etcd {}; leader: {})\n",
        f.node,
        f.etcd,
        f.leader.as_deref().unwrap_or("none")
    );
    if !f.unpublished.is_empty() {
        out.push_str(&format!(
            "  rolled back here, not yet in etcd: {}\n",
            f.unpublished.join(", ")
        ));
    }
    out.push_str(&format!(
        "{:<16} {:<16} {:<18} {:<18} {:<8} {:>8} {:>8} {:>7} {:>7} {:<8} {:>6}  {}\n",
        "SERVICE",
        "NODE",
        "RELEASE",
        "STATE",
        "WEIGHT",
        "CONNS",
        "CANARY",
        "FAILED",
        "C.FAIL",
        "ATTACHED",
        "HEARD",
        "LAST VERDICT"
    ));
    for n in &f.nodes {
        out.push_str(&format!(
            "{:<16} {:<16} {:<18} {:<18} {:<8} {:>8} {:>8} {:>7} {:>7} {:<8} {:>5}s  {}\n",
            n.service,
            n.node,
            n.release,
            n.state,
            n.weight,
            n.connections,
            n.canary_connections,
            n.failures,
            n.canary_failures,
            if n.attached { "yes" } else { "NO" },
            n.heard_secs_ago,
            n.verdict.as_deref().unwrap_or("-")
        ));
    }
    out
}
