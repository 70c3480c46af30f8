//! Outbound HTTP for Prometheus queries and webhooks: `http://` and
//! `https://` URLs, TLS by rustls (verified against a CA file, or the
//! system's bundle), and an optional `Authorization` header whose secret is
//! read from a file at each request (so a rotated token is picked up).
//! One request per connection; the callers speak HTTP/1.x themselves.

use std::{
    fmt, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::{
    TlsConnector,
    rustls::{
        ClientConfig, RootCertStore,
        pki_types::{CertificateDer, ServerName, pem::PemObject as _},
    },
};

/// Where distributions keep the system's CA bundle, tried in order when an
/// `https://` URL has no CA file of its own.
pub const SYSTEM_BUNDLES: [&str; 3] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// Largest secret file read (a Kubernetes service-account token is about
/// 1 KiB).
const MAX_SECRET: u64 = 16 * 1024;

/// A parsed `http://` or `https://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    /// `https://`.
    pub tls: bool,
    /// The host as written (a name or an address; IPv6 without brackets),
    /// for TLS server-name checks.
    pub host: String,
    /// `host:port` to connect to and to send as `Host` (port 80 or 443 if
    /// none was given).
    pub authority: String,
    /// The path (at least `/`).
    pub path: String,
}

impl Url {
    /// Parses `url`; the error says what is wrong, for a config message.
    pub fn parse(url: &str) -> Result<Url, String> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err("must start with http:// or https://".to_string());
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(
                "must not carry credentials; give them in the config's auth keys".to_string(),
            );
        }
        // [v6]:port, [v6], host:port, host.
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| "has an unclosed [ in its host".to_string())?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err("has no host".to_string());
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("has a bad port {p:?}"))?,
            None if tls => 443,
            None => 80,
        };
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Url {
            tls,
            host: host.to_string(),
            authority,
            path: path.to_string(),
        })
    }
}

/// How requests authenticate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    /// HTTP basic authentication; the password is the file's content
    /// (without a trailing newline).
    Basic {
        /// The user name.
        username: String,
        /// The file holding the password.
        password_file: PathBuf,
    },
    /// `Authorization: Bearer` with the file's content (a service-account
    /// token, say).
    Bearer {
        /// The file holding the token.
        token_file: PathBuf,
    },
}

impl Auth {
    /// The `Authorization` header's value, read from its file now.
    pub fn header(&self) -> Result<String, String> {
        match self {
            Auth::Basic {
                username,
                password_file,
            } => {
                let password = read_secret(password_file)?;
                Ok(format!(
                    "Basic {}",
                    base64(format!("{username}:{password}").as_bytes())
                ))
            }
            Auth::Bearer { token_file } => Ok(format!("Bearer {}", read_secret(token_file)?)),
        }
    }
}

/// The content of a secret file, without a trailing newline: one line of
/// printable ASCII (it goes into a header), at most [`MAX_SECRET`] bytes.
pub fn read_secret(path: &Path) -> Result<String, String> {
    use std::io::Read as _;
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_SECRET + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_SECRET {
        return Err(format!(
            "{} is larger than {MAX_SECRET} bytes; it should hold one secret",
            path.display()
        ));
    }
    let secret = text.strip_suffix('\n').unwrap_or(&text);
    let secret = secret.strip_suffix('\r').unwrap_or(secret);
    if secret.is_empty() || !secret.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(format!(
            "{} must hold one line of printable ASCII (it is sent in a header)",
            path.display()
        ));
    }
    Ok(secret.to_string())
}

/// Standard base64 with padding (RFC 4648), for basic authentication.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A connection, plain or TLS.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// Opens connections to one URL's server, with TLS for `https://`.
#[derive(Clone)]
pub struct Connector {
    tls: Option<TlsConnector>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Connector {
    /// A connector for `url`: for `https://`, verifying the server against
    /// the certificates in `ca` (PEM), or the system's bundle without one.
    /// The error names the file and what is wrong with it.
    pub fn new(url: &Url, ca: Option<&Path>) -> Result<Connector, String> {
        if !url.tls {
            return Ok(Connector { tls: None });
        }
        let bundle = match ca {
            Some(path) => path.to_path_buf(),
            None => SYSTEM_BUNDLES
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .ok_or_else(|| {
                    format!(
                        "no system CA bundle ({}); install ca-certificates or name a CA file",
                        SYSTEM_BUNDLES.join(", ")
                    )
                })?,
        };
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(&bundle)
            .map_err(|e| format!("cannot read {}: {e}", bundle.display()))?;
        for cert in certs {
            let cert =
                cert.map_err(|e| format!("{} is not PEM certificates: {e}", bundle.display()))?;
            roots.add(cert).map_err(|e| {
                format!(
                    "{} holds a certificate rustls refuses: {e}",
                    bundle.display()
                )
            })?;
        }
        if roots.is_empty() {
            return Err(format!("{} holds no certificate", bundle.display()));
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Connector {
            tls: Some(TlsConnector::from(Arc::new(config))),
        })
    }

    /// Connects to `url`'s server (and completes the TLS handshake).
    pub async fn connect(&self, url: &Url) -> io::Result<Box<dyn Conn>> {
        let tcp = TcpStream::connect(&url.authority).await?;
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let name = ServerName::try_from(url.host.clone())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(Box::new(tls.connect(name, tcp).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_their_default_ports_and_bad_ones_say_why() {
        assert_eq!(
            Url::parse("http://127.0.0.1:9999/hooks/canary"),
            Ok(Url {
                tls: false,
                host: "127.0.0.1".into(),
                authority: "127.0.0.1:9999".into(),
                path: "/hooks/canary".into()
            })
        );
        let u = Url::parse("https://prometheus.example").unwrap();
        assert_eq!(
            (u.tls, u.authority.as_str(), u.path.as_str()),
            (true, "prometheus.example:443", "/")
        );
        let u = Url::parse("http://[::1]:9090/prom").unwrap();
        assert_eq!(
            (u.host.as_str(), u.authority.as_str()),
            ("::1", "[::1]:9090")
        );
        assert_eq!(Url::parse("http://relay").unwrap().authority, "relay:80");
        for (bad, why) in [
            ("ftp://x", "must start with http:// or https://"),
            ("http://", "has no host"),
            ("http://x:99999/", "bad port"),
            ("https://user:pw@x/", "must not carry credentials"),
            ("http://[::1/", "unclosed ["),
        ] {
            let e = Url::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn base64_matches_rfc_4648() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("canary:s3cret", "Y2FuYXJ5OnMzY3JldA=="),
        ] {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain}");
        }
    }

    #[test]
    fn secrets_are_one_printable_line_read_at_each_use() {
        let dir = std::env::temp_dir().join(format!("canary-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "abc.def\n").unwrap();
        let auth = Auth::Bearer {
            token_file: file.clone(),
        };
        assert_eq!(auth.header().unwrap(), "Bearer abc.def");
        std::fs::write(&file, "rotated").unwrap();
        assert_eq!(auth.header().unwrap(), "Bearer rotated", "read at each use");
        std::fs::write(&file, "two\nlines\n").unwrap();
        assert!(
            auth.header()
                .unwrap_err()
                .contains("one line of printable ASCII")
        );
        std::fs::write(&file, "\n").unwrap();
        assert!(auth.header().is_err(), "an empty secret");
        let basic = Auth::Basic {
            username: "canary".into(),
            password_file: dir.join("missing"),
        };
        assert!(basic.header().unwrap_err().contains("cannot read"));
        std::fs::write(dir.join("pw"), "s3cret\n").unwrap();
        let basic = Auth::Basic {
            username: "canary".into(),
            password_file: dir.join("pw"),
        };
        assert_eq!(basic.header().unwrap(), "Basic Y2FuYXJ5OnMzY3JldA==");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_https_connector_needs_usable_certificates() {
        let url = Url::parse("https://prometheus.example").unwrap();
        let dir = std::env::temp_dir().join(format!("canary-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = Connector::new(&url, Some(&dir.join("missing.pem"))).unwrap_err();
        assert!(
            e.contains("cannot read") && e.contains("missing.pem"),
            "{e}"
        );
        std::fs::write(dir.join("empty.pem"), "not a certificate\n").unwrap();
        let e = Connector::new(&url, Some(&dir.join("empty.pem"))).unwrap_err();
        assert!(e.contains("holds no certificate"), "{e}");
        let plain = Url::parse("http://x").unwrap();
        assert!(
            Connector::new(&plain, Some(&dir.join("missing.pem"))).is_ok(),
            "no TLS, no CA read"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
