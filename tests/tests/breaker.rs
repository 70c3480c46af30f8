//! The line-rate breaker end to end: under load, the canary starts refusing
//! connections, and the data plane stops sending it new ones by itself.
#![expect(
    unused_crate_dependencies,
    reason = "cargo gives every test target all of the package's dependencies; each test file uses some"
)]
#![expect(
    clippy::float_cmp,
    reason = "the values compared are counts, or shares of all or none (0 or 1): exact in f64"
)]

use std::time::Duration;

use canary_lab::{AgentProcess, Behavior, Lab};
use canary_tests::{load::drive, metrics::scrape, scenarios::breaker_cutoff};

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
    let run = breaker_cutoff(&mut lab, VIP.parse().unwrap());
    let (failed, cutoff, other_errors) = (run.failed, run.cutoff, &run.other_errors);
    eprintln!(
        "breaker: {} attempts ({:.0}/s); {failed} failed client connections; \
         cut-off {:.3} ms from the first failed connection to the last one steered to canary; \
         {} other errors",
        run.attempts.len(),
        run.rate,
        cutoff.as_secs_f64() * 1e3,
        other_errors.len()
    );
    assert!(
        failed > 0,
        "the dead canary failed no connection: was it steered to?"
    );
    assert!(
        other_errors.is_empty(),
        "unexpected errors: {:?}",
        &other_errors[..other_errors.len().min(3)]
    );
    assert_eq!(
        run.canary_after, 0,
        "connections still reached the stopped canary"
    );
    assert!(
        failed <= 50,
        "{failed} failed client connections (target <= 50)"
    );
    assert!(
        cutoff <= Duration::from_millis(100),
        "cut-off {cutoff:?}: the breaker did not act at line rate"
    );
    let ok = run.attempts.iter().filter(|a| a.result.is_ok()).count();
    assert_eq!(ok + failed, run.attempts.len());

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
