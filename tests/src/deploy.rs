//! Helpers for the deploy test (tests/deploy.rs): where `deploy/` and the
//! Python tools are, and the manifests and configs read (and validated
//! against the Kubernetes schemas) by the venv's Python.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;

/// The Kubernetes version the manifests are validated against.
pub const K8S_VERSION: &str = "1.30.0";

/// The one file in `deploy/kubernetes/` that kustomization.yaml does not
/// list: it is run by hand, once per node, to uninstall.
pub const UNLISTED: &str = "uninstall-job.yaml";

/// Where the Secret with the etcd client certificate is mounted.
pub const ETCD_TLS_MOUNT: &str = "/etc/canary/etcd";

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `deploy/kubernetes/`.
pub fn kube_dir() -> PathBuf {
    workspace().join("deploy/kubernetes")
}

/// A program in the `target/py` venv (xtask/src/prereqs.rs installs it):
/// `$CARGO_TARGET_DIR/py`, else the workspace's `target/py`.
pub fn venv_bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace().join("target"), PathBuf::from);
    let bin = target.join("py/bin").join(name);
    assert!(
        bin.is_file(),
        "{} is missing: `cargo xtask prereqs` installs the deploy test's Python tools there",
        bin.display()
    );
    bin
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Reads YAML (every document) and TOML files with the venv's Python
/// (`PyYAML` comes with kubernetes-validate, tomllib with Python 3.11) and
/// validates every YAML document with kubernetes-validate's library: the
/// CLI cannot name a resource that has only `generateName` (the uninstall
/// Job), and reports a missing schema only as a warning.
pub const LOAD: &str = r#"
import json, sys, tomllib, yaml
import kubernetes_validate as kv
out = []
version = sys.argv[1]
for path in sys.argv[2:]:
    if path.endswith(".toml"):
        with open(path, "rb") as f:
            out.append({"file": path, "doc": tomllib.load(f), "schema": None})
        continue
    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for doc in docs:
        try:
            kv.validate(doc, version, strict=True)
            schema = "ok"
        except kv.SchemaNotFoundError:
            schema = "no-schema"
        except kv.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            schema = f"invalid at {where}: {e.message}"
        out.append({"file": path, "doc": doc, "schema": schema})
json.dump(out, sys.stdout)
"#;

/// One document of a manifest or config file.
pub struct Doc {
    pub file: String,
    pub value: Value,
    /// `"ok"`, `"no-schema"` or `"invalid at PATH: why"`; null for TOML.
    pub schema: Value,
}

pub fn load(files: &[PathBuf]) -> Vec<Doc> {
    let out = run(Command::new(venv_bin("python"))
        .args(["-c", LOAD, K8S_VERSION])
        .args(files));
    assert!(
        out.status.success(),
        "loading {files:?} failed: {}",
        text(&out.stderr)
    );
    let all: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    all.into_iter()
        .map(|mut v| Doc {
            file: v["file"].as_str().unwrap().to_string(),
            value: v["doc"].take(),
            schema: v["schema"].take(),
        })
        .collect()
}

pub fn load_one(file: &Path) -> Value {
    let mut docs = load(&[file.to_path_buf()]);
    assert_eq!(docs.len(), 1, "{} should hold one document", file.display());
    docs.remove(0).value
}

/// The strings of a JSON array (panics on anything else).
pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a list, saw {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

pub fn kustomization() -> Value {
    load_one(&kube_dir().join("kustomization.yaml"))
}

/// Every manifest kustomization.yaml lists, plus the uninstall Job.
pub fn manifests() -> Vec<Doc> {
    let mut files: Vec<PathBuf> = strings(&kustomization()["resources"])
        .iter()
        .map(|f| kube_dir().join(f))
        .collect();
    files.push(kube_dir().join(UNLISTED));
    load(&files)
}

pub fn find<'a>(docs: &'a [Doc], kind: &str) -> &'a Value {
    let found: Vec<&Doc> = docs.iter().filter(|d| d.value["kind"] == kind).collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} among the manifests, saw {}",
        found.len()
    );
    &found[0].value
}

/// The DaemonSet's agent container.
pub fn agent_container(daemonset: &Value) -> &Value {
    daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "agent")
        .expect("the DaemonSet has a container named agent")
}

/// The agent's config: `agent.toml`, which kustomize makes the `ConfigMap`.
pub fn agent_toml() -> PathBuf {
    kube_dir().join("agent.toml")
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("canary-deploy-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
