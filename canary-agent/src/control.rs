//! The control socket: a Unix socket speaking line-delimited JSON, one
//! request and one response per line, versioned and size-bounded.
//!
//! Connections are accepted and authorised here (peer credentials: root,
//! the agent's own user, or a member of `control_group`); requests are
//! parsed here and handed to the agent's main loop, which alone touches the
//! data plane. Nothing a client sends can disturb the agent: malformed,
//! oversized, unknown or unauthorised requests get a structured error.
//!
//! Request:  `{"v":1,"cmd":"set-weight","service":"web","weight":"5%"}`
//! Response: `{"v":1,"ok":true,"result":…}` or
//!           `{"v":1,"ok":false,"error":{"code":"…","message":"…"}}`

use std::{
    ffi::CString,
    future::Future,
    io,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc, oneshot},
};
use tracing::{debug, warn};

use crate::slots::{Slot, Slots};

/// Protocol version of requests and responses.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest request or response line, in bytes.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Largest status response (many services): responses may be longer than
/// requests.
pub const MAX_RESPONSE: usize = 16 * 1024 * 1024;
/// A client that sends nothing for this long is disconnected. Meanwhile it
/// is idle: when every slot is taken, the client idle longest is closed for
/// a newcomer, so idle clients never keep `canaryctl` out.
pub const IDLE: Duration = Duration::from_secs(10);
/// Time a client gets to read an answer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a group-membership look-up (NSS) may take before the peer is
/// refused.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Group-membership look-ups running at once. NSS (LDAP, sssd) may hang;
/// a look-up that does keeps its thread, so they are bounded here rather
/// than by tokio's pool of 512 blocking threads.
const MAX_LOOKUPS: usize = 8;

/// A request line as sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRequest {
    /// Protocol version; must be [`PROTOCOL_VERSION`].
    pub v: u32,
    /// `status`, `set-weight`, `pause`, `resume`, `approve`, `promote`,
    /// `rollback` or `reload`.
    pub cmd: String,
    /// The service the command is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// For `set-weight`: `"5%"`, `"0.25%"` or `"2500ppm"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<String>,
}

/// A validated command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Every service, or one.
    Status { service: Option<String> },
    /// Set the canary weight by hand.
    SetWeight {
        service: String,
        weight: crate::config::Weight,
    },
    /// Hold a plan-driven rollout.
    Pause { service: String },
    /// Back to the configured weight (clears a rollback, promotion or
    /// manual weight).
    Resume { service: String },
    /// Pass a manual gate of a plan.
    Approve { service: String },
    /// Everything to canary.
    Promote { service: String },
    /// Nothing new to canary.
    Rollback { service: String },
    /// Re-read the config file (as SIGHUP).
    Reload,
}

/// Error codes of the protocol.
pub mod code {
    /// Not JSON, or not a request object.
    pub const MALFORMED: &str = "malformed";
    /// Longer than [`super::MAX_MESSAGE`].
    pub const TOO_LARGE: &str = "too-large";
    /// A version this agent does not speak.
    pub const VERSION: &str = "unsupported-version";
    /// No such command.
    pub const UNKNOWN_COMMAND: &str = "unknown-command";
    /// A required argument is missing or invalid.
    pub const BAD_ARGUMENT: &str = "bad-argument";
    /// The peer may not use the socket.
    pub const UNAUTHORIZED: &str = "unauthorized";
    /// No service of that name.
    pub const UNKNOWN_SERVICE: &str = "unknown-service";
    /// The command does not apply in the service's state or config.
    pub const CONFLICT: &str = "conflict";
    /// Valid, but this build cannot do it yet.
    pub const NOT_BUILT: &str = "not-built";
    /// The agent failed while doing it (see its log).
    pub const INTERNAL: &str = "internal";
    /// Every connection slot is busy with a command; retry.
    pub const BUSY: &str = "busy";
}

/// An error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// One of [`code`].
    pub code: String,
    /// What went wrong and what to do.
    pub message: String,
}

/// A response line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Protocol version.
    pub v: u32,
    /// Whether the command succeeded.
    pub ok: bool,
    /// The command's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl Response {
    /// A success carrying `result`.
    pub fn ok(result: serde_json::Value) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            ok: true,
            result: Some(result),
            error: None,
        }
    }

    /// A failure.
    pub fn error(code: &str, message: impl Into<String>) -> Response {
        Response {
            v: PROTOCOL_VERSION,
            ok: false,
            result: None,
            error: Some(ErrorBody {
                code: code.to_string(),
                message: message.into(),
            }),
        }
    }
}

/// Parses one request line into a command, or the error to answer.
pub fn parse_request(line: &str) -> Result<Command, Response> {
    let raw: RawRequest = serde_json::from_str(line).map_err(|e| {
        Response::error(code::MALFORMED, format!("not a request: {e}; send one JSON object per line, e.g. {{\"v\":1,\"cmd\":\"status\"}}"))
    })?;
    if raw.v != PROTOCOL_VERSION {
        return Err(Response::error(
            code::VERSION,
            format!(
                "protocol version {} is not supported; this agent speaks {PROTOCOL_VERSION}",
                raw.v
            ),
        ));
    }
    let service = |raw: &RawRequest| {
        raw.service
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                Response::error(
                    code::BAD_ARGUMENT,
                    format!("{} needs a \"service\"", raw.cmd),
                )
            })
    };
    Ok(match raw.cmd.as_str() {
        "status" => Command::Status {
            service: raw.service.clone(),
        },
        "set-weight" => {
            let service = service(&raw)?;
            let text = raw.weight.as_deref().ok_or_else(|| {
                Response::error(
                    code::BAD_ARGUMENT,
                    "set-weight needs a \"weight\", e.g. \"5%\"",
                )
            })?;
            let weight = text.parse().map_err(|e| {
                Response::error(code::BAD_ARGUMENT, format!("weight {text:?}: {e}"))
            })?;
            Command::SetWeight { service, weight }
        }
        "pause" => Command::Pause {
            service: service(&raw)?,
        },
        "resume" => Command::Resume {
            service: service(&raw)?,
        },
        "approve" => Command::Approve {
            service: service(&raw)?,
        },
        "promote" => Command::Promote {
            service: service(&raw)?,
        },
        "rollback" => Command::Rollback {
            service: service(&raw)?,
        },
        "reload" => Command::Reload,
        other => {
            return Err(Response::error(
                code::UNKNOWN_COMMAND,
                format!(
                    "unknown command {other:?}; one of status, set-weight, pause, resume, approve, promote, rollback, reload"
                ),
            ));
        }
    })
}

/// A command on its way to the main loop, with the way back.
pub type Call = (Command, oneshot::Sender<Response>);

/// Who may use the socket.
#[derive(Clone, Debug)]
pub struct Access {
    /// The agent's own user (always allowed, as is root).
    pub owner_uid: u32,
    /// Members of this group may use it too.
    pub group: Option<(String, u32)>,
}

/// The control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another agent answers on the path.
    #[error("another canary-agent is serving {0}; stop it or set [agent] control_socket")]
    InUse(PathBuf),
    /// Creating, binding or setting permissions failed.
    #[error("cannot set up the control socket {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Something other than a socket is at the path.
    #[error(
        "{0} exists and is not a socket; the agent only replaces a stale socket, so remove it \
         yourself or set [agent] control_socket"
    )]
    NotASocket(PathBuf),
    /// `control_group` names no group.
    #[error("control_group {0:?} does not exist on this host (getent group lists them)")]
    NoSuchGroup(String),
}

/// Resolves a group name to its gid.
pub fn group_id(name: &str) -> Result<u32, ControlError> {
    let c = CString::new(name).map_err(|_| ControlError::NoSuchGroup(name.to_string()))?;
    let mut grp: libc::group = unsafe_zeroed_group();
    let mut buf = vec![0u8; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives it.
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut grp,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut out,
        )
    };
    if rc != 0 || out.is_null() {
        return Err(ControlError::NoSuchGroup(name.to_string()));
    }
    Ok(grp.gr_gid)
}

fn unsafe_zeroed_group() -> libc::group {
    // SAFETY: libc::group is plain C data (pointers and integers); all
    // zeroes is a valid (empty) value that getgrnam_r overwrites.
    unsafe { std::mem::zeroed() }
}

/// Whether user `uid` is a member of group `gid` (primary or listed).
fn in_group(uid: u32, primary_gid: u32, gid: u32) -> bool {
    if primary_gid == gid {
        return true;
    }
    // SAFETY: zeroed plain C data, overwritten by getpwuid_r.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0u8; 16 * 1024];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; buf outlives it.
    let rc =
        unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr().cast(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return false;
    }
    let mut groups = vec![0 as libc::gid_t; 256];
    let mut n = groups.len() as libc::c_int;
    // SAFETY: pw_name points into buf (alive); groups has room for n.
    let rc = unsafe { libc::getgrouplist(pw.pw_name, pw.pw_gid, groups.as_mut_ptr(), &mut n) };
    rc >= 0 && groups[..n.max(0) as usize].contains(&gid)
}

impl Access {
    /// Who may use the socket: root, the agent's user (`geteuid`), and the
    /// members of `group`, resolved off the runtime thread (NSS may block on
    /// the network).
    pub async fn resolve(group: Option<&str>) -> Result<Access, ControlError> {
        let group = match group {
            None => None,
            Some(name) => {
                let owned = name.to_string();
                let gid = tokio::task::spawn_blocking(move || group_id(&owned))
                    .await
                    .map_err(|_| ControlError::NoSuchGroup(name.to_string()))??;
                Some((name.to_string(), gid))
            }
        };
        Ok(Access {
            // SAFETY: geteuid has no preconditions.
            owner_uid: unsafe { libc::geteuid() },
            group,
        })
    }

    /// Whether a peer with these credentials may use the socket. May call
    /// NSS: blocking.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        self.allows_at_once(uid, gid).unwrap_or_else(|| {
            self.group
                .as_ref()
                .is_some_and(|(_, g)| in_group(uid, gid, *g))
        })
    }

    /// The answer when it needs no look-up: root, the owner, the group as
    /// primary group, or no group configured. `None`: ask NSS.
    fn allows_at_once(&self, uid: u32, gid: u32) -> Option<bool> {
        if uid == 0 || uid == self.owner_uid {
            return Some(true);
        }
        match &self.group {
            None => Some(false),
            Some((_, g)) if *g == gid => Some(true),
            Some(_) => None,
        }
    }
}

/// Binds the socket at `path`: parent directory created, a stale socket
/// replaced (a live one is an error), mode 0660, group `access.group`.
pub fn bind(path: &Path, access: &Access) -> Result<UnixListener, ControlError> {
    let io_err = |source| ControlError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    // Only a stale socket is replaced: a regular file (or anything else) a
    // typo pointed at is refused, never deleted.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ControlError::NotASocket(path.to_owned()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(io_err)?;
    }
    let listener = UnixListener::bind(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(io_err)?;
    if let Some((_, gid)) = &access.group {
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|e| io_err(io::Error::other(e)))?;
        // SAFETY: `c` is a valid path string; -1 keeps the owner.
        if unsafe { libc::chown(c.as_ptr(), u32::MAX, *gid) } != 0 {
            return Err(io_err(io::Error::last_os_error()));
        }
    }
    Ok(listener)
}

/// The control socket server: listener, access rules and connection slots,
/// kept so that a supervisor can restart the accept loop.
pub struct ControlServer {
    listener: Arc<UnixListener>,
    access: Arc<Access>,
    calls: mpsc::Sender<Call>,
    slots: Arc<Slots>,
    lookups: Arc<Semaphore>,
}

impl ControlServer {
    /// A server on `listener` (see [`bind`]); each request goes to `calls`.
    pub fn new(listener: UnixListener, access: Access, calls: mpsc::Sender<Call>) -> ControlServer {
        ControlServer {
            listener: Arc::new(listener),
            access: Arc::new(access),
            calls,
            slots: Arc::new(Slots::new(MAX_CONNECTIONS)),
            lookups: Arc::new(Semaphore::new(MAX_LOOKUPS)),
        }
    }

    /// The accept loop; runs until dropped.
    pub fn serve(&self) -> impl Future<Output = ()> + Send + use<> {
        let (listener, access, calls, slots, lookups) = (
            Arc::clone(&self.listener),
            Arc::clone(&self.access),
            self.calls.clone(),
            Arc::clone(&self.slots),
            Arc::clone(&self.lookups),
        );
        async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let Some(slot) = crate::slots::acquire(&slots).await else {
                            busy(&stream);
                            continue;
                        };
                        let (access, calls, lookups) =
                            (Arc::clone(&access), calls.clone(), Arc::clone(&lookups));
                        tokio::spawn(async move {
                            if let Err(e) =
                                connection(stream, &access, &calls, &lookups, slot).await
                            {
                                debug!(error = %e, "control connection ended");
                            }
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    }
}

/// Tells a client that every slot is busy, without waiting for it.
fn busy(stream: &UnixStream) {
    let resp = Response::error(
        code::BUSY,
        format!("the agent is busy with {MAX_CONNECTIONS} other commands; retry"),
    );
    if let Ok(mut bytes) = serde_json::to_vec(&resp) {
        bytes.push(b'\n');
        let _ = stream.try_write(&bytes);
    }
}

/// Whether the peer may use the socket: at once for root, the owner and
/// the primary group; otherwise through a bounded, timed NSS look-up off
/// the runtime thread.
async fn authorized(access: &Arc<Access>, uid: u32, gid: u32, lookups: &Arc<Semaphore>) -> bool {
    if let Some(answer) = access.allows_at_once(uid, gid) {
        return answer;
    }
    let Ok(permit) = Arc::clone(lookups).try_acquire_owned() else {
        warn!(
            uid,
            "control peer refused: too many group look-ups pending (is NSS hanging?)"
        );
        return false;
    };
    let access = Arc::clone(access);
    let lookup = tokio::task::spawn_blocking(move || {
        let _permit = permit; // held until the look-up really ends
        access.allows(uid, gid)
    });
    match tokio::time::timeout(LOOKUP_TIMEOUT, lookup).await {
        Ok(Ok(allowed)) => allowed,
        Ok(Err(_)) => false,
        Err(_) => {
            warn!(
                uid,
                "control peer refused: the group look-up took longer than 5s"
            );
            false
        }
    }
}

async fn connection(
    stream: UnixStream,
    access: &Arc<Access>,
    calls: &mpsc::Sender<Call>,
    lookups: &Arc<Semaphore>,
    slot: Slot,
) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    // A pending look-up is as good as idle: under pressure it yields its
    // slot (root, the owner and the primary group need no look-up).
    let Some(allowed) = slot
        .idle(authorized(access, cred.uid(), cred.gid(), lookups))
        .await
    else {
        return Ok(());
    };
    let mut reader = BufReader::new(read);
    if !allowed {
        // The request is read first (and ignored): answering before the
        // client has finished writing would close the socket under it, and
        // it would see a broken pipe instead of the reason.
        let mut line = Vec::new();
        if slot
            .idle(tokio::time::timeout(
                IDLE,
                read_line(&mut reader, &mut line),
            ))
            .await
            .is_none()
        {
            return Ok(());
        }
        let who = match &access.group {
            Some((name, _)) => format!("root, the agent's user or members of group {name:?}"),
            None => {
                "root or the agent's user (set [agent] control_group to let a group in)".to_string()
            }
        };
        let resp = Response::error(
            code::UNAUTHORIZED,
            format!("uid {} may not use this socket: only {who}", cred.uid()),
        );
        return send(&mut write, &resp).await;
    }
    loop {
        let mut line = Vec::new();
        let Some(read) = slot
            .idle(tokio::time::timeout(
                IDLE,
                read_line(&mut reader, &mut line),
            ))
            .await
        else {
            return Ok(()); // evicted for a newcomer
        };
        let response = match read {
            Err(_) | Ok(Ok(LineRead::Eof)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(LineRead::TooLong)) => {
                let resp = Response::error(
                    code::TOO_LARGE,
                    format!("request longer than {MAX_MESSAGE} bytes; the connection is closed"),
                );
                return send(&mut write, &resp).await;
            }
            Ok(Ok(LineRead::Line)) => match std::str::from_utf8(&line) {
                Err(_) => Response::error(code::MALFORMED, "request is not UTF-8"),
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => match parse_request(text.trim()) {
                    Err(resp) => resp,
                    Ok(cmd) => {
                        let (tx, rx) = oneshot::channel();
                        if calls.send((cmd, tx)).await.is_err() {
                            return Ok(()); // shutting down
                        }
                        rx.await.unwrap_or_else(|_| {
                            Response::error(code::INTERNAL, "the agent is shutting down")
                        })
                    }
                },
            },
        };
        send(&mut write, &response).await?;
    }
}

enum LineRead {
    Line,
    Eof,
    TooLong,
}

/// Reads one `\n`-terminated line of at most MAX_MESSAGE bytes.
async fn read_line<R: AsyncBufReadExt + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
) -> io::Result<LineRead> {
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if line.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line
            });
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if line.len() + chunk.len() > MAX_MESSAGE {
            return Ok(LineRead::TooLong);
        }
        line.extend_from_slice(chunk);
        let used = done.unwrap_or(buf.len());
        reader.consume(used);
        if done.is_some() {
            return Ok(LineRead::Line);
        }
    }
}

/// Writes one answer line; a client too slow to read it is dropped.
async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, resp: &Response) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(resp).map_err(io::Error::other)?;
    bytes.push(b'\n');
    tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client too slow to read"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_into_commands() {
        assert_eq!(
            parse_request(r#"{"v":1,"cmd":"status"}"#),
            Ok(Command::Status { service: None })
        );
        assert_eq!(
            parse_request(r#"{"v":1,"cmd":"set-weight","service":"web","weight":"0.25%"}"#),
            Ok(Command::SetWeight {
                service: "web".into(),
                weight: "2500ppm".parse().unwrap()
            })
        );
        assert_eq!(
            parse_request(r#"{"v":1,"cmd":"reload"}"#),
            Ok(Command::Reload)
        );
        assert_eq!(
            parse_request(r#"{"v":1,"cmd":"rollback","service":"web"}"#),
            Ok(Command::Rollback {
                service: "web".into()
            })
        );
    }

    #[test]
    fn bad_requests_get_structured_errors() {
        let err = |line: &str| parse_request(line).unwrap_err().error.unwrap();
        assert_eq!(err("not json").code, code::MALFORMED);
        assert_eq!(err(r#"{"v":2,"cmd":"status"}"#).code, code::VERSION);
        assert_eq!(
            err(r#"{"v":1,"cmd":"explode"}"#).code,
            code::UNKNOWN_COMMAND
        );
        assert_eq!(
            err(r#"{"v":1,"cmd":"status","extra":1}"#).code,
            code::MALFORMED
        );
        assert_eq!(err(r#"{"v":1,"cmd":"promote"}"#).code, code::BAD_ARGUMENT);
        let e = err(r#"{"v":1,"cmd":"set-weight","service":"web","weight":"150%"}"#);
        assert_eq!(e.code, code::BAD_ARGUMENT);
        assert!(e.message.contains("more than 100%"), "{}", e.message);
    }

    #[test]
    fn root_and_the_owner_are_always_allowed() {
        let a = Access {
            owner_uid: 1000,
            group: None,
        };
        assert!(a.allows(0, 0) && a.allows(1000, 1000));
        assert!(!a.allows(1001, 1001));
        let a = Access {
            owner_uid: 0,
            group: Some(("ops".into(), 4242)),
        };
        assert!(a.allows(5000, 4242), "primary group member");
        assert!(!a.allows(5000, 5000));
    }
}
