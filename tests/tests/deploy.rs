//! The deployment artefacts in `deploy/`, checked offline: no cluster, no
//! image registry, no systemd running.
//!
//! - Kubernetes (`deploy/kubernetes/`): every file is listed in
//!   `kustomization.yaml` (or is the documented exception), every manifest
//!   validates with `kubernetes-validate --strict` against Kubernetes
//!   [`K8S_VERSION`], the `PodMonitor` (a CRD, which kubernetes-validate has
//!   no schema for) is checked field by field against what the Prometheus
//!   Operator documents, the DaemonSet agrees with the agent's config and
//!   command line, and the config itself passes `canary-agent --check`.
//! - `yamllint --strict` with `deploy/.yamllint` over all of `deploy/`.
//! - systemd: `systemd-analyze verify` on the unit, and its capabilities
//!   are the DaemonSet's.
//! - `deploy/Containerfile`: every COPY source exists, every workspace
//!   member is copied, the binaries copied out are the agent's targets.
//!
//! The Python tools live in the venv `cargo xtask prereqs` (and `cargo
//! xtask test`) creates at `target/py`. A missing tool fails the test: it
//! never skips, in CI or anywhere else.
#![expect(
    unused_crate_dependencies,
    reason = "cargo gives every test target all of the package's dependencies; each test file uses some"
)]

use std::{collections::BTreeSet, path::Path, process::Command};

use canary_tests::deploy::{
    ETCD_TLS_MOUNT, K8S_VERSION, TempDir, UNLISTED, agent_container, agent_toml, find, kube_dir,
    kustomization, load_one, manifests, run, strings, text, venv_bin, workspace,
};
use serde_json::Value;

#[test]
fn kustomization_lists_every_file_and_every_manifest_validates() {
    let k = kustomization();
    let resources: BTreeSet<String> = strings(&k["resources"]).into_iter().collect();
    let generated: BTreeSet<String> = k["configMapGenerator"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| strings(&g["files"]))
        .collect();
    for entry in std::fs::read_dir(kube_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let listed = if name == "kustomization.yaml" || name == UNLISTED {
            true
        } else if Path::new(&name).extension().is_some_and(|e| e == "yaml") {
            resources.contains(&name)
        } else {
            generated.contains(&name)
        };
        assert!(
            listed,
            "deploy/kubernetes/{name} is not in kustomization.yaml (resources: {resources:?}, configMapGenerator files: {generated:?})"
        );
    }
    for name in resources.iter().chain(&generated) {
        assert!(
            kube_dir().join(name).is_file(),
            "kustomization.yaml lists {name}, which does not exist"
        );
    }

    let docs = manifests();
    let mut validated = BTreeSet::new();
    for d in &docs {
        let kind = d.value["kind"].as_str().unwrap_or("?");
        match (kind, d.schema.as_str()) {
            (_, Some("ok")) => {
                validated.insert(kind.to_string());
            }
            // A CRD: checked against the operator's documented fields in
            // podmonitor_selects_the_agents_and_scrapes_their_metrics_port.
            ("PodMonitor", Some("no-schema")) => {}
            (_, other) => panic!(
                "{} ({kind}) against Kubernetes {K8S_VERSION}: expected valid, saw {other:?}",
                d.file
            ),
        }
    }
    let expected: BTreeSet<String> = ["DaemonSet", "Job", "Namespace", "Service", "ServiceAccount"]
        .map(String::from)
        .into();
    assert_eq!(
        validated, expected,
        "the kinds validated with a schema (strict) against Kubernetes {K8S_VERSION}"
    );
}

#[test]
fn podmonitor_selects_the_agents_and_scrapes_their_metrics_port() {
    let docs = manifests();
    let pm = find(&docs, "PodMonitor");
    let ds = find(&docs, "DaemonSet");
    let svc = find(&docs, "Service");
    assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");

    // The fields the Prometheus Operator's API reference gives PodMonitor
    // (spec) and PodMetricsEndpoint; a misspelt key would be dropped by the
    // API server's pruning and the scrape silently not configured.
    let spec_fields = [
        "jobLabel",
        "podTargetLabels",
        "podMetricsEndpoints",
        "selector",
        "namespaceSelector",
        "sampleLimit",
        "targetLimit",
        "labelLimit",
        "attachMetadata",
    ];
    let endpoint_fields = [
        "port",
        "portNumber",
        "targetPort",
        "path",
        "scheme",
        "params",
        "interval",
        "scrapeTimeout",
        "honorLabels",
        "honorTimestamps",
        "relabelings",
        "metricRelabelings",
        "enableHttp2",
        "filterRunning",
    ];
    let relabel_fields = [
        "sourceLabels",
        "separator",
        "targetLabel",
        "regex",
        "modulus",
        "replacement",
        "action",
    ];
    let keys = |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    for k in keys(&pm["spec"]) {
        assert!(
            spec_fields.contains(&k.as_str()),
            "PodMonitor spec.{k} is not a PodMonitor field"
        );
    }

    // A PodMonitor without namespaceSelector selects pods in its own
    // namespace: the agents'.
    assert_eq!(pm["metadata"]["namespace"], ds["metadata"]["namespace"]);
    assert!(pm["spec"]["namespaceSelector"].is_null());
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (selector, of) in [
        (&pm["spec"]["selector"]["matchLabels"], "PodMonitor"),
        (&svc["spec"]["selector"], "Service"),
    ] {
        let selector = selector.as_object().unwrap();
        assert!(!selector.is_empty(), "the {of} selects every pod");
        for (k, v) in selector {
            assert_eq!(
                &pod_labels[k], v,
                "{of} selects {k}={v}; the agent pods have {k}={}",
                pod_labels[k]
            );
        }
    }

    let agent = agent_container(ds);
    let ports: Vec<&str> = agent["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    let endpoints = pm["spec"]["podMetricsEndpoints"].as_array().unwrap();
    assert!(!endpoints.is_empty(), "the PodMonitor has no endpoint");
    for e in endpoints {
        for k in keys(e) {
            assert!(
                endpoint_fields.contains(&k.as_str()),
                "podMetricsEndpoints[].{k} is not a PodMetricsEndpoint field"
            );
        }
        for r in e["relabelings"].as_array().into_iter().flatten() {
            for k in keys(r) {
                assert!(
                    relabel_fields.contains(&k.as_str()),
                    "relabelings[].{k} is not a RelabelConfig field"
                );
            }
        }
        let port = e["port"].as_str().expect("endpoint port is a port name");
        assert!(
            ports.contains(&port),
            "PodMonitor scrapes port {port}; the agent's ports are {ports:?}"
        );
        assert_eq!(e["path"], "/metrics");
        let interval = e["interval"].as_str().unwrap();
        assert!(
            interval.len() > 1
                && interval.ends_with(['s', 'm'])
                && interval[..interval.len() - 1]
                    .bytes()
                    .all(|b| b.is_ascii_digit()),
            "interval {interval:?} is not a Prometheus duration like 15s"
        );
    }

    // The headless Service exposes the same named port.
    assert_eq!(svc["spec"]["clusterIP"], "None");
    let svc_port = &svc["spec"]["ports"][0];
    assert!(ports.contains(&svc_port["targetPort"].as_str().unwrap()));
}

#[test]
fn daemonset_agrees_with_the_agent_config() {
    let docs = manifests();
    let ds = find(&docs, "DaemonSet");
    let config = load_one(&agent_toml());
    let pod = &ds["spec"]["template"]["spec"];
    let agent = agent_container(ds);
    assert_eq!(pod["hostNetwork"], true);
    assert!(pod["hostPID"].is_null(), "hostPID: the agent needs none");
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );

    // Capabilities: exactly these, everything else dropped
    // (systemd_unit_verifies_and_grants_the_daemonsets_capabilities holds
    // the unit to the same set).
    let sc = &agent["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(
        strings(&sc["capabilities"]["add"]),
        ["BPF", "NET_ADMIN", "PERFMON"]
    );

    // The metrics port and the probes are [agent] metrics_addr's port, on
    // every address (the pod uses the node's network).
    let metrics_addr = config["agent"]["metrics_addr"].as_str().unwrap();
    let (host, port) = metrics_addr.rsplit_once(':').unwrap();
    assert_eq!(
        host, "0.0.0.0",
        "metrics_addr must listen beyond loopback for Prometheus"
    );
    let metrics = agent["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "metrics")
        .expect("a port named metrics");
    assert_eq!(metrics["containerPort"].to_string(), port);
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        assert_eq!(agent[probe]["httpGet"]["path"], "/metrics", "{probe}");
        assert_eq!(agent[probe]["httpGet"]["port"], "metrics", "{probe}");
    }

    // The node name: from the downward API, through Kubernetes' own $(VAR)
    // expansion in args.
    let env = agent["env"].as_array().unwrap();
    let node = env
        .iter()
        .find(|e| e["name"] == "CANARY_NODE")
        .expect("env CANARY_NODE");
    assert_eq!(node["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");
    let args = strings(&agent["args"]);
    assert!(
        args.windows(2).any(|w| w == ["--node", "$(CANARY_NODE)"]),
        "args {args:?} pass no --node $(CANARY_NODE)"
    );

    // Every path the config names is on a mount of the right host path.
    let mounts: Vec<(String, String)> = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().unwrap().to_string(),
                m["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let volumes = pod["volumes"].as_array().unwrap();
    let volume_of = |path: &str| -> &Value {
        let (_, name) = mounts
            .iter()
            .filter(|(m, _)| Path::new(path).starts_with(m))
            .max_by_key(|(m, _)| m.len())
            .unwrap_or_else(|| panic!("nothing is mounted where the agent uses {path}"));
        volumes.iter().find(|v| &v["name"] == name).unwrap()
    };
    let agent_cfg = &config["agent"];
    let host_path = |path: &str| {
        volume_of(path)["hostPath"]["path"]
            .as_str()
            .map(String::from)
    };
    let bpffs_dir = agent_cfg["bpffs_dir"].as_str().unwrap();
    assert_eq!(
        host_path(bpffs_dir).as_deref(),
        Some("/sys/fs/bpf"),
        "bpffs_dir {bpffs_dir}"
    );
    let state_dir = agent_cfg["state_dir"].as_str().unwrap();
    assert_eq!(host_path(state_dir).as_deref(), Some(state_dir));
    let socket = agent_cfg["control_socket"].as_str().unwrap();
    let socket_dir = Path::new(socket).parent().unwrap().to_str().unwrap();
    assert_eq!(host_path(socket).as_deref(), Some(socket_dir));
    // No [agent] cgroup: the default, the first cgroup2 mount, which is
    // the host's root mounted over the container's own.
    assert!(agent_cfg["cgroup"].is_null());
    assert_eq!(
        host_path("/sys/fs/cgroup").as_deref(),
        Some("/sys/fs/cgroup")
    );

    // The config file is the generated ConfigMap's agent.toml at --config.
    let at = args.iter().position(|a| a == "--config").unwrap();
    let config_path = &args[at + 1];
    let config_volume = volume_of(config_path);
    let generator = &kustomization()["configMapGenerator"][0];
    assert_eq!(config_volume["configMap"]["name"], generator["name"]);
    assert!(config_path.ends_with("/agent.toml"));

    // The fleet's TLS files are in the Secret's mount.
    let fleet = &config["fleet"];
    for key in ["ca", "cert", "key"] {
        let file = fleet[key]
            .as_str()
            .unwrap_or_else(|| panic!("[fleet] {key}"));
        assert!(file.starts_with(ETCD_TLS_MOUNT), "[fleet] {key} = {file}");
        assert!(
            volume_of(file)["secret"]["secretName"].is_string(),
            "[fleet] {key}"
        );
    }
    for endpoint in strings(&fleet["etcd"]) {
        assert!(
            endpoint.starts_with("https://"),
            "etcd endpoint {endpoint} is not TLS"
        );
    }
}

/// Runs the real agent with the DaemonSet's arguments on the `ConfigMap`'s
/// agent.toml, `--check` only.
#[test]
fn configmap_config_passes_the_agents_check_with_the_daemonsets_args() {
    let docs = manifests();
    let ds = find(&docs, "DaemonSet");
    let agent = agent_container(ds);
    assert_eq!(strings(&agent["command"]), ["canary-agent"]);
    let original = std::fs::read_to_string(agent_toml()).unwrap();
    let dir = TempDir::new("check");
    let file = dir.0.join("agent.toml");
    let mut args: Vec<String> = strings(&agent["args"])
        .into_iter()
        .map(|a| match a.as_str() {
            "/etc/canary/agent.toml" => file.to_str().unwrap().to_string(),
            "$(CANARY_NODE)" => "node-1".to_string(),
            _ => a,
        })
        .collect();
    // Interface names are node-specific and --check requires them to exist
    // here: lo stands in for them (--interface replaces the list after the
    // file's `interfaces` has been parsed).
    args.extend(["--check", "--interface", "lo"].map(String::from));

    std::fs::write(&file, &original).unwrap();
    let out = run(Command::new(canary_lab::agent_binary()).args(&args));
    assert!(
        out.status.success(),
        "canary-agent {args:?} rejected deploy/kubernetes/agent.toml: {}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("valid (1 services)"),
        "expected the agent to report the file valid with 1 service, saw {stdout:?}"
    );
}

#[test]
fn yamllint_accepts_everything_in_deploy() {
    let deploy = workspace().join("deploy");
    let config = deploy.join(".yamllint");
    let yamllint = venv_bin("yamllint");
    // Proof of what was linted: the files yamllint picks.
    let listed = run(Command::new(&yamllint)
        .arg("-c")
        .arg(&config)
        .arg("--list-files")
        .arg(&deploy));
    let listed = text(&listed.stdout);
    for f in [
        "kustomization.yaml",
        "daemonset.yaml",
        "podmonitor.yaml",
        UNLISTED,
    ] {
        assert!(
            listed.contains(f),
            "yamllint does not lint {f}; it lists {listed}"
        );
    }
    let out = run(Command::new(&yamllint)
        .arg("-c")
        .arg(&config)
        .args(["--strict", "--format", "parsable"])
        .arg(&deploy));
    assert!(
        out.status.success(),
        "yamllint --strict found problems in deploy/: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `KEY=value` lines of a unit file, in order.
fn unit_settings(unit: &str) -> Vec<(&str, &str)> {
    unit.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .collect()
}

#[test]
fn systemd_unit_verifies_and_grants_the_daemonsets_capabilities() {
    let unit =
        std::fs::read_to_string(workspace().join("deploy/systemd/canary-agent.service")).unwrap();
    let settings = unit_settings(&unit);
    let one = |key: &str| -> &str {
        let found: Vec<&str> = settings
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(found.len(), 1, "{key} should be set once, saw {found:?}");
        found[0]
    };
    assert_eq!(one("Type"), "simple", "the agent does not speak sd_notify");
    assert_eq!(one("Restart"), "always");
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("StateDirectory"), "canary");
    assert_eq!(one("RuntimeDirectory"), "canary");
    assert_eq!(one("RuntimeDirectoryPreserve"), "yes");
    assert_eq!(one("LimitMEMLOCK"), "infinity");
    let exec_start = one("ExecStart");
    assert!(
        exec_start.starts_with("/usr/local/bin/canary-agent ")
            && !exec_start.contains("--detach-on-exit"),
        "ExecStart {exec_start:?}: the agent, leaving the data plane pinned when it stops"
    );

    // The same capabilities as the DaemonSet's agent.
    let docs = manifests();
    let sc = &agent_container(find(&docs, "DaemonSet"))["securityContext"];
    let want: Vec<String> = strings(&sc["capabilities"]["add"])
        .iter()
        .map(|c| format!("CAP_{c}"))
        .collect();
    let bounding: Vec<&str> = one("CapabilityBoundingSet").split_whitespace().collect();
    assert_eq!(
        bounding, want,
        "the unit's CapabilityBoundingSet against the DaemonSet's capabilities"
    );

    // systemd-analyze checks every directive and that each command exists
    // and is executable: point the unit's /usr/local/bin at the binaries
    // built here (`systemctl` is not needed, nor a running systemd).
    let built = canary_lab::agent_binary();
    assert!(
        built.is_file(),
        "{} is missing: build the agent first",
        built.display()
    );
    let dir = TempDir::new("systemd");
    let copy = dir.0.join("canary-agent.service");
    let bin_dir = built.parent().unwrap().to_str().unwrap().to_string();
    std::fs::write(&copy, unit.replace("/usr/local/bin", &bin_dir)).unwrap();
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&copy));
    let stderr = text(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: expected no findings, saw ({}) {stderr}",
        out.status
    );
}

#[test]
fn containerfile_copies_what_exists_and_ships_the_agents_binaries() {
    let file = std::fs::read_to_string(workspace().join("deploy/Containerfile")).unwrap();
    // Instructions, with continuation lines joined.
    let joined = file
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let instructions: Vec<Vec<&str>> = joined
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|w| !w.is_empty())
        .collect();

    let metadata = run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(workspace())
            .args([
                "metadata",
                "--no-deps",
                "--format-version",
                "1",
                "--offline",
            ]),
    );
    assert!(
        metadata.status.success(),
        "cargo metadata: {}",
        text(&metadata.stderr)
    );
    let metadata: Value = serde_json::from_slice(&metadata.stdout).unwrap();
    let root = Path::new(metadata["workspace_root"].as_str().unwrap());
    let packages = metadata["packages"].as_array().unwrap();
    let members: BTreeSet<String> = packages
        .iter()
        .map(|p| {
            let dir = Path::new(p["manifest_path"].as_str().unwrap())
                .parent()
                .unwrap();
            dir.strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let agent_bins: BTreeSet<String> = packages
        .iter()
        .find(|p| p["name"] == "canary-agent")
        .unwrap()["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| strings(&t["kind"]) == ["bin"])
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();

    let mut copied = BTreeSet::new();
    let mut shipped = BTreeSet::new();
    for words in instructions.iter().filter(|w| w[0] == "COPY") {
        let args = &words[1..];
        let (from_stage, paths) = match args.first() {
            Some(a) if a.starts_with("--from=") => (true, &args[1..]),
            _ => (false, args),
        };
        let (dest, sources) = paths.split_last().unwrap();
        assert!(!sources.is_empty(), "COPY without a source: {words:?}");
        for src in sources {
            if from_stage {
                let bin = src
                    .strip_prefix("/src/target/release/")
                    .unwrap_or_else(|| panic!("COPY --from copies {src}, not a release binary"));
                shipped.insert(bin.to_string());
            } else {
                assert!(
                    workspace().join(src).exists(),
                    "COPY {src} {dest}: {src} does not exist in the repository"
                );
                copied.insert(src.trim_end_matches('/').to_string());
            }
        }
    }
    for m in &members {
        assert!(
            copied.contains(m),
            "workspace member {m} is not copied (cargo needs every member)"
        );
    }
    assert!(
        copied.contains("Cargo.lock"),
        "Cargo.lock is not copied (the build uses --locked)"
    );
    assert_eq!(
        shipped, agent_bins,
        "binaries shipped against canary-agent's bin targets"
    );

    let build = instructions
        .iter()
        .find(|w| w[0] == "RUN" && w.contains(&"build"))
        .expect("a RUN cargo build");
    assert!(
        build.windows(2).any(|w| w == ["-p", "canary-agent"]),
        "{build:?}"
    );
    assert!(build.contains(&"--release"), "{build:?}");

    // bpf-linker: the version xtask installs (xtask/src/prereqs.rs).
    let prereqs = std::fs::read_to_string(workspace().join("xtask/src/prereqs.rs")).unwrap();
    let version = prereqs
        .lines()
        .find_map(|l| l.strip_prefix("const BPF_LINKER: &str = \""))
        .and_then(|rest| rest.strip_suffix("\";"))
        .expect("const BPF_LINKER in xtask/src/prereqs.rs");
    assert!(
        joined.contains(&format!("bpf-linker@{version} --locked")),
        "the Containerfile installs another bpf-linker than xtask's {version}"
    );
}
