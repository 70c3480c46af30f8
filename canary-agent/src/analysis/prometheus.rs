//! An instant-query client for Prometheus's HTTP API (`/api/v1/query`),
//! over the agent's outbound connections (`crate::outbound`: http or
//! https, optional authentication; no HTTP crate): one HTTP/1.0 request
//! per query (so the answer is never chunked and ends when the connection
//! closes), bounded in time and size.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::outbound::{Auth, Connector, Url};

/// Largest answer read; a bigger one is an error (a check's query should
/// return one series).
pub const MAX_RESPONSE: usize = 1 << 20;

/// Where Prometheus answers, `http[s]://host:port[/prefix]`, and how the
/// agent talks to it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The base URL.
    pub url: Url,
    /// Path prefix before `/api/v1/query` (empty, or `/prom` behind a
    /// proxy), without a trailing slash.
    pub prefix: String,
    /// The CA file an `https://` server is verified against (`None`: the
    /// system's bundle).
    pub ca: Option<PathBuf>,
    /// How queries authenticate, if at all.
    pub auth: Option<Auth>,
    /// Built from the above once, when the config is read.
    connector: Connector,
}

impl PartialEq for Endpoint {
    fn eq(&self, other: &Endpoint) -> bool {
        // The connector is derived from the rest.
        (&self.url, &self.ca, &self.auth) == (&other.url, &other.ca, &other.auth)
    }
}

impl Eq for Endpoint {}

impl Endpoint {
    /// Parses a base URL and sets up TLS for it (`ca`: see [`Endpoint::ca`]).
    /// The error says what is wrong, for a config message.
    pub fn new(url: &str, ca: Option<PathBuf>, auth: Option<Auth>) -> Result<Endpoint, String> {
        let url = Url::parse(url)?;
        if url.path.contains(['?', '#']) {
            return Err("must not have a query or fragment; give the server's base URL".into());
        }
        let connector = Connector::new(&url, ca.as_deref())?;
        Ok(Endpoint {
            prefix: url.path.trim_end_matches('/').to_string(),
            url,
            ca,
            auth,
            connector,
        })
    }

    /// A plain-http endpoint for `http://authority` (tests).
    ///
    /// # Panics
    /// If `authority` is no `host:port`.
    #[cfg(test)]
    pub fn plain(authority: &str) -> Endpoint {
        Endpoint::new(&format!("http://{authority}"), None, None)
            .unwrap_or_else(|e| panic!("{authority}: {e}"))
    }
}

/// One series of an instant query's answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Its labels (empty for a scalar).
    pub labels: BTreeMap<String, String>,
    /// Its value (may be NaN or infinite).
    pub value: f64,
}

/// Why a query gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No connection (Prometheus down, refused, unreachable, or its TLS
    /// certificate not trusted).
    #[error("cannot connect to Prometheus at {authority}")]
    Connect {
        /// Where.
        authority: String,
        /// The OS's word.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke while the query was sent or answered.
    #[error("the connection to Prometheus broke")]
    Io(#[source] std::io::Error),
    /// No complete answer within the timeout.
    #[error("Prometheus did not answer within {0:?}")]
    Timeout(Duration),
    /// The answer was larger than [`MAX_RESPONSE`].
    #[error("Prometheus's answer is larger than {MAX_RESPONSE} bytes")]
    TooLarge,
    /// Not an HTTP answer, or not the API's JSON.
    #[error("unreadable answer from Prometheus: {0}")]
    Malformed(String),
    /// The credentials could not be read.
    #[error("cannot authenticate to Prometheus: {0}")]
    Auth(String),
    /// Prometheus refused the credentials.
    #[error(
        "Prometheus answered {0}: check [analysis] username, password_file or bearer_token_file"
    )]
    Unauthorized(String),
    /// Prometheus refused or failed the query.
    #[error("Prometheus answered {status}: {error_type}: {error}")]
    Prometheus {
        /// The HTTP status line's code.
        status: String,
        /// `errorType` (`bad_data`, `timeout`, `execution`…).
        error_type: String,
        /// Prometheus's message.
        error: String,
    },
    /// A range vector or string, not an instant vector or scalar.
    #[error("the query returns a {0}; a check needs an instant vector or a scalar")]
    WrongType(String),
}

/// Runs `promql` as an instant query at `endpoint`, within `timeout`.
pub async fn query(
    endpoint: &Endpoint,
    promql: &str,
    timeout: Duration,
) -> Result<Vec<Series>, QueryError> {
    let authorization = match &endpoint.auth {
        Some(auth) => format!(
            "Authorization: {}\r\n",
            auth.header().map_err(QueryError::Auth)?
        ),
        None => String::new(),
    };
    let exchange = async {
        let mut s = endpoint
            .connector
            .connect(&endpoint.url)
            .await
            .map_err(|source| QueryError::Connect {
                authority: endpoint.url.authority.clone(),
                source,
            })?;
        let head = format!(
            "GET {}/api/v1/query?query={} HTTP/1.0\r\nHost: {}\r\nAccept: application/json\r\n\
             User-Agent: canary-agent\r\n{authorization}\r\n",
            endpoint.prefix,
            url_encode(promql),
            endpoint.url.authority
        );
        s.write_all(head.as_bytes()).await.map_err(QueryError::Io)?;
        let mut body = Vec::new();
        let mut limited = (&mut s).take(MAX_RESPONSE as u64 + 1);
        limited
            .read_to_end(&mut body)
            .await
            .map_err(QueryError::Io)?;
        if body.len() > MAX_RESPONSE {
            return Err(QueryError::TooLarge);
        }
        Ok(body)
    };
    let raw = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| QueryError::Timeout(timeout))??;
    parse_response(&raw)
}

/// Parses a whole HTTP answer of `/api/v1/query`.
pub fn parse_response(raw: &[u8]) -> Result<Vec<Series>, QueryError> {
    let text = std::str::from_utf8(raw).map_err(|e| QueryError::Malformed(e.to_string()))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| QueryError::Malformed("no end of headers".into()))?;
    let status = head
        .split(' ')
        .nth(1)
        .filter(|_| head.starts_with("HTTP/"))
        .ok_or_else(|| QueryError::Malformed("not an HTTP answer".into()))?
        .to_string();
    if status == "401" || status == "403" {
        return Err(QueryError::Unauthorized(status));
    }
    let json: serde_json::Value = serde_json::from_str(body)
        .map_err(|e| QueryError::Malformed(format!("HTTP {status}, body is not JSON ({e})")))?;
    let field = |k: &str| json.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    if field("status") != "success" {
        return Err(QueryError::Prometheus {
            status,
            error_type: field("errorType").to_string(),
            error: first_chars(field("error"), 300),
        });
    }
    parse_data(json.get("data").unwrap_or(&serde_json::Value::Null))
}

/// `data` of a successful answer: `{"resultType": …, "result": …}`.
fn parse_data(data: &serde_json::Value) -> Result<Vec<Series>, QueryError> {
    let bad = |why: &str| QueryError::Malformed(why.to_string());
    let kind = data
        .get("resultType")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad("no resultType"))?;
    let result = data.get("result").ok_or_else(|| bad("no result"))?;
    match kind {
        "scalar" => Ok(vec![Series {
            labels: BTreeMap::new(),
            value: sample_value(result).ok_or_else(|| bad("scalar without a [time, value]"))?,
        }]),
        "vector" => result
            .as_array()
            .ok_or_else(|| bad("vector result is not a list"))?
            .iter()
            .map(|s| {
                let labels = s
                    .get("metric")
                    .and_then(|m| m.as_object())
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value = s
                    .get("value")
                    .and_then(sample_value)
                    .ok_or_else(|| bad("vector sample without a [time, value]"))?;
                Ok(Series { labels, value })
            })
            .collect(),
        other => Err(QueryError::WrongType(other.to_string())),
    }
}

/// `[1700000000.123, "0.5"]` → 0.5 (Prometheus writes values as strings:
/// "NaN", "+Inf" and "-Inf" included).
fn sample_value(v: &serde_json::Value) -> Option<f64> {
    let text = v.as_array()?.get(1)?.as_str()?;
    match text {
        "NaN" => Some(f64::NAN),
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        t => t.parse().ok(),
    }
}

/// The first `n` characters of `text` (an error message could be huge).
fn first_chars(text: &str, n: usize) -> String {
    text.chars().take(n).collect()
}

/// Percent-encodes a query parameter.
pub fn url_encode(s: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(b));
            }
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: &str, body: &str) -> Vec<u8> {
        format!("HTTP/1.0 {status}\r\nContent-Type: application/json\r\n\r\n{body}").into_bytes()
    }

    #[test]
    fn vectors_scalars_and_special_values_parse() {
        let v = parse_response(&answer(
            "200 OK",
            r#"{"status":"success","data":{"resultType":"vector","result":[
               {"metric":{"cohort":"canary"},"value":[1700000000.5,"0.031"]},
               {"metric":{},"value":[1700000000.5,"NaN"]}]}}"#,
        ))
        .unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(
            v[0].labels.get("cohort").map(String::as_str),
            Some("canary")
        );
        assert!((v[0].value - 0.031).abs() < 1e-12);
        assert!(v[1].value.is_nan());
        let s = parse_response(&answer(
            "200 OK",
            r#"{"status":"success","data":{"resultType":"scalar","result":[1,"+Inf"]}}"#,
        ))
        .unwrap();
        assert!(s[0].value.is_infinite() && s[0].value > 0.0);
        let empty = parse_response(&answer(
            "200 OK",
            r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#,
        ))
        .unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn errors_say_what_prometheus_said() {
        let e = parse_response(&answer(
            "400 Bad Request",
            r#"{"status":"error","errorType":"bad_data","error":"parse error at char 5"}"#,
        ))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Prometheus answered 400: bad_data: parse error at char 5"
        );
        let e = parse_response(&answer(
            "200 OK",
            r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#,
        ))
        .unwrap_err();
        assert!(
            matches!(e, QueryError::WrongType(ref t) if t == "matrix"),
            "{e}"
        );
        let e = parse_response(b"garbage").unwrap_err();
        assert!(matches!(e, QueryError::Malformed(_)), "{e}");
    }

    #[test]
    fn endpoints_take_a_prefix() {
        let e = Endpoint::new("http://prom.local:9090/prometheus/", None, None).unwrap();
        assert_eq!(
            (e.url.authority.as_str(), e.prefix.as_str()),
            ("prom.local:9090", "/prometheus")
        );
        assert_eq!(Endpoint::plain("p:9090").prefix, "");
        assert!(Endpoint::new("http://p/x?y=1", None, None).is_err());
        assert!(Endpoint::new("ftp://p", None, None).is_err());
    }

    #[tokio::test]
    async fn a_silent_server_is_a_timeout_and_a_closed_port_a_connect_error() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ep = Endpoint::plain(&addr.to_string());
        let e = query(&ep, "up", Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(
            matches!(e, QueryError::Timeout(d) if d == Duration::from_millis(200)),
            "{e}"
        );
        drop(listener);
        let e = query(&ep, "up", Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(e, QueryError::Connect { .. }), "{e}");
    }
}
