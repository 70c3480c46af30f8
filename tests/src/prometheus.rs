//! A real Prometheus server (Debian's package), run inside a lab namespace
//! on loopback, scraping the agent.

use std::{
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use canary_lab::Netns;

use crate::metrics::{http_get, try_http_get};

/// Where the server listens inside the namespace.
pub const ADDR: &str = "127.0.0.1:9090";

/// A running Prometheus; killed and its data removed on drop.
pub struct Prometheus<'a> {
    ns: &'a Netns,
    child: Child,
    dir: PathBuf,
    /// Where it answers from inside `ns`.
    addr: std::net::SocketAddr,
}

impl<'a> Prometheus<'a> {
    /// Starts Prometheus in `ns`, scraping `target` (host:port) every second.
    pub fn start(ns: &'a Netns, target: &str) -> Prometheus<'a> {
        Prometheus::start_scraping(ns, &[target])
    }

    /// Starts Prometheus in `ns`, scraping every one of `targets`
    /// (host:port) every second.
    pub fn start_scraping(ns: &'a Netns, targets: &[&str]) -> Prometheus<'a> {
        Prometheus::start_on(ns, ADDR, targets)
    }

    /// Starts Prometheus in `ns` listening on `listen` (`ip:port`; for
    /// other namespaces to reach it, an address of `ns`), scraping every
    /// one of `targets` every second.
    pub fn start_on(ns: &'a Netns, listen: &str, targets: &[&str]) -> Prometheus<'a> {
        Prometheus::launch(ns, listen, targets, None)
    }

    /// Starts Prometheus in `ns` on `listen` serving https only, with the
    /// server certificate `tls` made (see [`crate::tls::make_tls`]), and
    /// basic authentication for `user` with `password` (bcrypt-hashed by
    /// `htpasswd`), scraping `targets`. [`Prometheus::query`] does not speak
    /// TLS: this one is for the agent.
    pub fn start_secured(
        ns: &'a Netns,
        listen: &str,
        targets: &[&str],
        tls_dir: &std::path::Path,
        user: &str,
        password: &str,
    ) -> Prometheus<'a> {
        let out = std::process::Command::new("htpasswd")
            .args(["-nbBC", "10", user, password])
            .output()
            .expect("run htpasswd (Debian apache2-utils; `cargo xtask test` installs it)");
        assert!(out.status.success(), "htpasswd failed");
        let line = String::from_utf8_lossy(&out.stdout);
        let hash = line
            .trim()
            .split_once(':')
            .map(|(_, h)| h.to_string())
            .expect("htpasswd prints user:hash");
        let web = format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\nbasic_auth_users:\n  {user}: '{hash}'\n",
            tls_dir.join("server.crt").display(),
            tls_dir.join("server.key").display(),
        );
        Prometheus::launch(ns, listen, targets, Some(&web))
    }

    fn launch(
        ns: &'a Netns,
        listen: &str,
        targets: &[&str],
        web_config: Option<&str>,
    ) -> Prometheus<'a> {
        let addr: std::net::SocketAddr = listen.parse().expect("listen address");
        let target = targets.join("', '");
        let dir = std::env::temp_dir().join(format!(
            "canary-prometheus-{}-{}",
            std::process::id(),
            ns.name()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("prometheus data dir");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: canary\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("prometheus config");
        let mut command = ns.command("prometheus");
        if let Some(web) = web_config {
            let file = dir.join("web.yml");
            std::fs::write(&file, web).expect("prometheus web config");
            command.arg(format!("--web.config.file={}", file.display()));
        }
        let child = command
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={listen}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus (installed by `cargo xtask test`)");
        let prom = Prometheus {
            ns,
            child,
            dir,
            addr,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = if web_config.is_some() {
                // Listening: the agent's queries wait out the rest.
                let addr = prom.addr;
                prom.ns
                    .spawn(move || std::net::TcpStream::connect(addr).is_ok())
                    .join()
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(false)
            } else {
                try_http_get(prom.ns, prom.addr, "/-/ready", "*/*")
                    .is_ok_and(|(head, _)| head.starts_with("HTTP/1.1 200"))
            };
            if ready {
                return prom;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within 30 s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Evaluates an instant PromQL query; the value of its first result.
    pub fn query(&self, promql: &str) -> Option<f64> {
        // {"metric":{...},"value":[ts,"v"]}
        self.series(promql).first()?["value"][1]
            .as_str()?
            .parse()
            .ok()
    }

    /// Evaluates an instant PromQL query; every series of its result (an
    /// error answer fails the test with Prometheus' message).
    pub fn series(&self, promql: &str) -> Vec<serde_json::Value> {
        let (status, body) = http_get(
            self.ns,
            self.addr,
            &format!("/api/v1/query?query={}", url_encode(promql)),
        );
        assert!(status.contains("200"), "query {promql}: {status} {body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("Prometheus answers JSON");
        json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Prometheus<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
