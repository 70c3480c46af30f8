//! Reading the agent's `/metrics` the way Prometheus does.

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use canary_lab::Netns;

/// `GET path` on `addr` from inside `ns`; returns (status line, body).
pub fn http_get(ns: &Netns, addr: SocketAddr, path: &str) -> (String, String) {
    let (head, body) = http_get_accept(ns, addr, path, "*/*");
    (head.lines().next().unwrap_or_default().to_string(), body)
}

/// `GET path` with an `Accept` header; returns (whole response head, body).
pub fn http_get_accept(ns: &Netns, addr: SocketAddr, path: &str, accept: &str) -> (String, String) {
    try_http_get(ns, addr, path, accept).unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"))
}

/// `GET path` from inside `ns`, without panicking (for readiness probes).
pub fn try_http_get(
    ns: &Netns,
    addr: SocketAddr,
    path: &str,
    accept: &str,
) -> std::io::Result<(String, String)> {
    let (path, accept) = (path.to_string(), accept.to_string());
    ns.spawn(move || -> std::io::Result<(String, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response")
        })?;
        Ok((head.to_string(), body.to_string()))
    })
    .join()
    .expect("HTTP client thread")?
}

/// The agent's exposition, scraped from inside `ns` at the default address.
pub fn scrape(ns: &Netns) -> Exposition {
    let (status, body) = http_get(ns, "127.0.0.1:9477".parse().unwrap(), "/metrics");
    assert!(status.contains("200"), "GET /metrics: {status}\n{body}");
    Exposition::parse(&body)
}

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed text exposition.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Parses sample lines (comments skipped).
    pub fn parse(text: &str) -> Exposition {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|line| {
                let (series, value) = line
                    .rsplit_once(' ')
                    .unwrap_or_else(|| panic!("bad sample line {line:?}"));
                let (name, labels) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                let labels = split_labels(labels)
                    .into_iter()
                    .map(|kv| {
                        let (k, v) = kv
                            .split_once('=')
                            .unwrap_or_else(|| panic!("bad label {kv:?} in {line:?}"));
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                let value = match value {
                    "+Inf" => f64::INFINITY,
                    v => v
                        .parse()
                        .unwrap_or_else(|_| panic!("bad value in {line:?}")),
                };
                Sample {
                    name: name.to_string(),
                    labels,
                    value,
                }
            })
            .collect();
        Exposition {
            text: text.to_string(),
            samples,
        }
    }

    /// Samples named `name` whose labels include `want`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        want: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && want
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// Sum of the samples named `name` whose labels include `want`.
    ///
    /// Panics if no sample matches: a missing series (a renamed metric, a
    /// label value never exported, a service never configured) is not a
    /// zero, and an assertion that something is 0 must not pass on it.
    pub fn sum(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        let mut found = false;
        let sum = self
            .matching(name, want)
            .inspect(|_| found = true)
            .map(|s| s.value)
            .sum();
        assert!(
            found,
            "no sample {name} with labels {want:?} in the exposition ({} samples)",
            self.samples.len()
        );
        sum
    }

    /// `histogram_quantile(q, …)` over the `{name}_bucket` series matching
    /// `want`, as PromQL computes it (linear inside the bucket).
    pub fn quantile(&self, name: &str, want: &[(&str, &str)], q: f64) -> Option<f64> {
        let bucket_name = format!("{name}_bucket");
        let mut buckets: Vec<(f64, f64)> = self
            .matching(&bucket_name, want)
            .map(|s| {
                (
                    s.labels["le"].parse::<f64>().unwrap_or(f64::INFINITY),
                    s.value,
                )
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total = buckets.last()?.1;
        if total == 0.0 {
            return None;
        }
        let rank = q * total;
        let mut prev = (0.0, 0.0);
        for &(le, count) in &buckets {
            if count >= rank {
                if le.is_infinite() {
                    return Some(prev.0);
                }
                return Some(prev.0 + (le - prev.0) * (rank - prev.1) / (count - prev.1));
            }
            prev = (le, count);
        }
        None
    }
}

/// Splits `a="x",b="y,z"` at commas outside quotes.
fn split_labels(s: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted) = (Vec::new(), 0, false);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}
