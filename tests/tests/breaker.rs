//! The line-rate breaker end to end: under load, the canary starts refusing
//! connections, and the data plane stops sending it new ones by itself.

use std::{
    io::ErrorKind,
    time::{Duration, Instant},
};

use canary_lab::{AgentProcess, Behavior, Lab};
use canary_tests::{
    load::{CANARY_PREFIX, drive, join_timed, spawn_timed},
    metrics::scrape,
};

const VIP: &str = "10.96.0.10:80";

fn config(lab: &Lab, state_dir: &std::path::Path) -> String {
    format!(
        "[agent]\ninterfaces = [\"{}\"]\nstate_dir = \"{}\"\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\n\
         stable = [\"{}\"]\ncanary = [\"{}\"]\nweight = \"20%\"\ncohort = \"per-connection\"\n",
        Lab::ROUTER_CLIENT_IFACE,
        state_dir.display(),
        lab.backend_addr(0),
        lab.backend_addr(1),
    )
}

#[test]
fn a_canary_that_starts_refusing_is_cut_off_by_the_data_plane_within_milliseconds() {
    let mut lab = canary_tests::lab(
        &[("stable-1", Behavior::Reply), ("canary-1", Behavior::Reply)],
        32,
    );
    let state_dir =
        std::env::temp_dir().join(format!("canary-breaker-state-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state_dir);
    let agent =
        AgentProcess::start(lab.router(), &config(&lab, &state_dir), false).expect("agent starts");

    // 1000 new connections/s, 20 % canary (default breaker settings).
    let rate = 1000.0;
    let handles = spawn_timed(&lab, VIP.parse().unwrap(), lab.client_addrs(), 4000, rate);
    std::thread::sleep(Duration::from_millis(1500));
    let stopped_at = Instant::now();
    lab.stop_backend(1); // the canary process dies: its port refuses
    let attempts = join_timed(handles);

    // Refused by the dead port; reset (connections still queued in the
    // dying listener's backlog get a RST when it closes); or closed without
    // a reply (accepted just as the process stopped).
    let canary_failure = |a: &&canary_tests::load::Attempt| {
        matches!(
            a.result,
            Err(ErrorKind::ConnectionRefused
                | ErrorKind::ConnectionReset
                | ErrorKind::UnexpectedEof)
        )
    };
    let failed: Vec<_> = attempts.iter().filter(canary_failure).collect();
    let other_errors: Vec<_> = attempts
        .iter()
        .filter(|a| a.result.is_err() && !canary_failure(a))
        .collect();
    let canary_after: Vec<_> = attempts
        .iter()
        .filter(|a| {
            a.start > stopped_at
                && a.result
                    .as_ref()
                    .is_ok_and(|n| n.starts_with(CANARY_PREFIX))
        })
        .collect();
    let ok = attempts.iter().filter(|a| a.result.is_ok()).count();
    let first_failure = failed
        .iter()
        .map(|a| a.end)
        .min()
        .expect("the dead canary failed connections");
    let last_steered = failed.iter().map(|a| a.start).max().unwrap();
    let cutoff = last_steered.saturating_duration_since(first_failure);
    let elapsed = attempts.last().unwrap().start - attempts[0].start;
    eprintln!(
        "breaker: {} attempts in {:.2} s ({:.0}/s); {} failed client connections; \
         cut-off {:.3} ms from the first failed connection to the last one steered to canary; \
         {} other errors",
        attempts.len(),
        elapsed.as_secs_f64(),
        attempts.len() as f64 / elapsed.as_secs_f64(),
        failed.len(),
        cutoff.as_secs_f64() * 1e3,
        other_errors.len()
    );
    assert!(
        other_errors.is_empty(),
        "unexpected errors: {:?}",
        &other_errors[..other_errors.len().min(3)]
    );
    assert!(
        canary_after.is_empty(),
        "{} connections still reached the stopped canary",
        canary_after.len()
    );
    assert!(
        failed.len() <= 50,
        "{} failed client connections (target <= 50)",
        failed.len()
    );
    assert!(
        cutoff <= Duration::from_millis(100),
        "cut-off {cutoff:?}: the breaker did not act at line rate"
    );
    assert_eq!(ok + failed.len(), attempts.len());

    // The agent recorded it: log, metrics, persisted state.
    let m = scrape(lab.router());
    assert_eq!(
        m.sum(
            "canary_rollbacks_total",
            &[("service", "web"), ("reason", "breaker")]
        ),
        1.0
    );
    assert_eq!(
        m.sum(
            "canary_rollout_state",
            &[("service", "web"), ("state", "rolled-back")]
        ),
        1.0
    );
    assert!(
        agent.log().iter().any(|l| l.contains("rollout-state")
            && l.contains("rolled-back")
            && l.contains("breaker")),
        "no rollout-state line for the breaker's rollback"
    );
    let state = std::fs::read_to_string(state_dir.join("web.json")).expect("rollback persisted");
    assert!(
        state.contains("rolled-back") && state.contains("breaker"),
        "{state}"
    );
    let (status, _) = agent.stop().expect("agent stops");
    assert!(status.success());

    // A restart does not re-raise it, even with the canary healthy again.
    let agent = AgentProcess::start(lab.router(), &config(&lab, &state_dir), false)
        .expect("agent restarts");
    let out = drive(&lab, VIP.parse().unwrap(), lab.client_addrs(), 500);
    out.assert_no_errors("after restart");
    assert_eq!(
        out.canary(),
        0,
        "a restart re-raised the rolled-back canary: {:?}",
        out.by_backend
    );
    let m = scrape(lab.router());
    assert_eq!(
        m.sum(
            "canary_rollout_state",
            &[("service", "web"), ("state", "rolled-back")]
        ),
        1.0
    );

    // Clearing: remove the state file and reload.
    std::fs::remove_file(state_dir.join("web.json")).unwrap();
    let mut agent = agent;
    agent.reload(&config(&lab, &state_dir)).expect("reload");
    let out = drive(&lab, VIP.parse().unwrap(), lab.client_addrs(), 500);
    assert!(
        out.errors.len() as u64 > 0 && out.canary() == 0,
        "canary is still down, so canary-steered ones fail"
    );
    agent.stop().expect("agent stops");
    let _ = std::fs::remove_dir_all(&state_dir);
}
