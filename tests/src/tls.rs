//! Test certificates, made with the `openssl` CLI (Debian's `openssl`,
//! installed by `cargo xtask test`): a CA, a server certificate and a
//! client certificate, for a real etcd and a real Prometheus over TLS.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// PEM files of a client identity (what etcd's `--trusted-ca-file`
/// accepts), for agents and `etcdctl`, and the CA that signed the server.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The CA that signed the members' server certificate (and the client's).
    pub ca: PathBuf,
    /// The client certificate (CN `canary-agent`, extended key usage
    /// clientAuth).
    pub cert: PathBuf,
    /// The client's private key (PKCS#8, P-256).
    pub key: PathBuf,
}

/// Generates, in `dir`, a CA (`ca.crt`, named `ca_name`), a server
/// certificate (`server.crt`, `server.key`; CN `server_cn`) for 127.0.0.1,
/// `localhost` and `sans` (`IP:…`, `DNS:…`), and a client certificate, with
/// the `openssl` CLI. Returns the client's files.
pub fn make_tls(dir: &Path, ca_name: &str, server_cn: &str, sans: &[String]) -> TlsFiles {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .expect("run openssl (Debian openssl; `cargo xtask test` installs it)");
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca_subject = format!("/CN={ca_name}");
    // Key usage on the CA too: strict verifiers (rustls, `openssl verify
    // -x509_strict`) insist on it.
    let mut ca = vec![
        "req",
        "-x509",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-days",
        "2",
        "-subj",
        &ca_subject,
    ];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.crt"]);
    openssl(&ca);
    let mut sans = sans.to_vec();
    sans.extend(["IP:127.0.0.1".to_owned(), "DNS:localhost".to_owned()]);
    // The server certificate also serves as client: etcd's gRPC gateway
    // dials its own client port with it.
    for (name, cn, ext) in [
        (
            "server",
            server_cn,
            format!(
                "subjectAltName={}\nextendedKeyUsage=serverAuth,clientAuth\n",
                sans.join(",")
            ),
        ),
        (
            "client",
            "canary-agent",
            "extendedKeyUsage=clientAuth\n".to_owned(),
        ),
    ] {
        let ext_file = format!("{name}.ext");
        fs::write(
            dir.join(&ext_file),
            format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n{ext}"),
        )
        .expect("write an openssl extension file");
        let (key, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        let subj = format!("/CN={cn}");
        let mut req = vec!["req", "-subj", &subj];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr]);
        openssl(&req);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext_file,
            "-out",
            &crt,
        ]);
    }
    TlsFiles {
        ca: dir.join("ca.crt"),
        cert: dir.join("client.crt"),
        key: dir.join("client.key"),
    }
}
