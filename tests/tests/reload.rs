//! Reload safety: a saved rollout state that no longer fits the new config
//! ends the rollout or is refused, never drops connections as
//! `no_backend`; reloads that replace services or backends at the
//! configured limits work; a refused reload changes nothing.
#![expect(
    unused_crate_dependencies,
    reason = "cargo gives every test target all of the package's dependencies; each test file uses some"
)]
#![expect(
    clippy::float_cmp,
    reason = "the values compared are counts, or shares of all or none (0 or 1): exact in f64"
)]

use canary_lab::{AgentProcess, Behavior, Lab};
use canary_tests::{load::drive, metrics::scrape};

const VIP: &str = "10.96.0.10:80";
const VIP2: &str = "10.96.0.20:8080";
const IFACE: &str = Lab::ROUTER_CLIENT_IFACE;

fn lab() -> Lab {
    canary_tests::lab(
        &[
            ("stable-1", Behavior::Reply),
            ("stable-2", Behavior::Reply),
            ("canary-1", Behavior::Reply),
        ],
        8,
    )
}

use canary_tests::canaryctl_ok as ctl;

fn state(agent: &AgentProcess) -> String {
    let out = ctl(&agent.control_socket(), &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    v["services"][0]["state"]
        .as_str()
        .expect("a state")
        .to_string()
}

fn no_backend_drops(lab: &Lab) -> f64 {
    scrape(lab.router()).sum("canary_dataplane_errors_total", &[("reason", "no_backend")])
}

#[test]
fn removing_the_canary_list_after_a_promotion_ends_the_rollout_instead_of_dropping() {
    let lab = lab();
    let with_canary = |agent: &str| {
        format!(
            "[agent]\ninterfaces = [\"{IFACE}\"]\n{agent}\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\n\
             stable = [\"{}\"]\ncanary = [\"{}\"]\nweight = \"5%\"\n",
            lab.backend_addr(0),
            lab.backend_addr(2),
        )
    };
    let mut agent = AgentProcess::start(lab.router(), &with_canary(""), false).expect("starts");
    ctl(&agent.control_socket(), &["promote", "web"]);
    assert_eq!(state(&agent), "promoted");
    let out = drive(&lab, VIP.parse().unwrap(), lab.client_addrs(), 100);
    out.assert_no_errors("promoted");
    assert_eq!(
        out.canary(),
        100,
        "promoted: every new connection to canary"
    );

    // The usual end of a promotion: the canary becomes the stable set.
    let promoted = format!(
        "[agent]\ninterfaces = [\"{IFACE}\"]\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\n\
         stable = [\"{}\"]\n",
        lab.backend_addr(2),
    );
    agent.reload(&promoted).expect("the reload applies");
    assert_eq!(state(&agent), "idle", "the rollout ended");
    assert!(
        agent
            .log()
            .iter()
            .any(|l| l.contains("rollout state changed by the config")
                && l.contains("no canary backends")),
        "the end of the rollout is logged with its reason"
    );
    let out = drive(&lab, VIP.parse().unwrap(), lab.client_addrs(), 200);
    out.assert_no_errors("after the canary list was removed");
    assert_eq!(no_backend_drops(&lab), 0.0, "nothing dropped as no_backend");
    assert!(
        !agent.dir().join("state/web.json").exists(),
        "idle is persisted as no state file"
    );
}

#[test]
fn a_saved_plan_step_the_new_plan_lacks_is_refused_and_changes_nothing() {
    let lab = lab();
    let plan = |steps: &str| {
        format!(
            "[agent]\ninterfaces = [\"{IFACE}\"]\n\n[[service]]\nname = \"web\"\nvip = \"{VIP}\"\n\
             stable = [\"{}\"]\ncanary = [\"{}\"]\ncohort = \"per-connection\"\n\n[service.rollout]\n\
             interval = \"10m\"\nsteps = [{steps}]\n",
            lab.backend_addr(0),
            lab.backend_addr(2),
        )
    };
    let three = "{ weight = \"10%\", hold = \"1h\" }, { weight = \"50%\", hold = \"1h\" }, { weight = \"90%\", hold = \"1h\" }";
    let mut agent = AgentProcess::start(lab.router(), &plan(three), false).expect("starts");
    // Step 3 of 3 by hand: the state file is the agent's, written as it
    // would write it.
    std::fs::write(
        agent.dir().join("state/web.json"),
        "{\"state\":\"progressing\",\"step\":2,\"since_unix\":1}",
    )
    .expect("write the state");
    agent.reload(&plan(three)).expect("reload at step 3");
    let before = drive(&lab, VIP.parse().unwrap(), lab.client_addrs(), 300);
    before.assert_no_errors("at step 3");
    assert!(
        before.canary() > 200,
        "step 3 is 90 %: {:?}",
        before.by_backend
    );

    let err = agent
        .reload(&plan("{ weight = \"10%\", hold = \"1h\" }"))
        .expect_err("a plan without the saved step is refused");
    assert!(
        err.to_string().contains("step 3 of its plan") && err.to_string().contains("has 1 steps"),
        "{err:#}"
    );
    assert_eq!(state(&agent), "progressing");
    let after = drive(&lab, VIP.parse().unwrap(), lab.client_addrs(), 300);
    after.assert_no_errors("after the refused reload");
    assert!(
        after.canary() > 200,
        "still 90 % after the refused reload: {:?}",
        after.by_backend
    );
}

#[test]
fn replacing_every_service_and_backend_at_the_configured_limits_works() {
    let lab = lab();
    let one = |name: &str, vip: &str, stable: usize, canary: usize| {
        format!(
            "[agent]\ninterfaces = [\"{IFACE}\"]\nmax_services = 1\nmax_backends = 2\n\n\
             [[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nstable = [\"{}\"]\ncanary = [\"{}\"]\n\
             weight = \"50%\"\ncohort = \"per-connection\"\n",
            lab.backend_addr(stable),
            lab.backend_addr(canary),
        )
    };
    let mut agent =
        AgentProcess::start(lab.router(), &one("web", VIP, 0, 2), false).expect("starts");
    drive(&lab, VIP.parse().unwrap(), lab.client_addrs(), 100).assert_no_errors("before");
    // A new name, a new VIP and both backends swapped at once, at
    // max_services = 1 and max_backends = 2.
    agent
        .reload(&one("web2", VIP2, 1, 0))
        .expect("the reload fits beside the old services and backends");
    let out = drive(&lab, VIP2.parse().unwrap(), lab.client_addrs(), 200);
    out.assert_no_errors("on the new VIP");
    let names: Vec<&String> = out.by_backend.keys().collect();
    assert_eq!(
        names,
        ["stable-1", "stable-2"],
        "the new backends answer: {:?}",
        out.by_backend
    );
    // And back: the old entries are gone, so it fits again.
    agent
        .reload(&one("web", VIP, 0, 2))
        .expect("and back again");
    drive(&lab, VIP.parse().unwrap(), lab.client_addrs(), 100).assert_no_errors("back");
}
