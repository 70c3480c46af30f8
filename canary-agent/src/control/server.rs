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

//! The control socket server: binding the socket, deciding who may use
//! it, and serving connections within bounds.
//!
//! Connections are accepted and authorised here (peer credentials: root,
//! the agent's own user, or a member of `control_group`); each request
//! line is decoded by [`super::protocol`] and handed to the agent's main
//! loop, which alone touches the data plane. Nothing a client sends can
//! disturb the agent: malformed, oversized, unknown or unauthorised
//! requests get a structured error.

use std::{
    future::Future,
    io,
    os::unix::fs::{FileTypeExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc, oneshot},
};
use tracing::{debug, warn};

use super::protocol::{ErrorCode, MAX_MESSAGE, Request, Response, parse_request};
use crate::{
    slots::{Slot, Slots},
    sys,
};

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

/// A command on its way to the main loop, with the way back.
pub type Call = (Request, oneshot::Sender<Response>);

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

impl Access {
    /// Who may use the socket: root, the agent's user (`geteuid`), and the
    /// members of `group`, resolved off the runtime thread (NSS may block on
    /// the network).
    pub async fn resolve(group: Option<&str>) -> Result<Access, ControlError> {
        let group = match group {
            None => None,
            Some(name) => {
                let owned = name.to_string();
                let gid = tokio::task::spawn_blocking(move || sys::group_id(&owned))
                    .await
                    .ok()
                    .flatten()
                    .ok_or_else(|| ControlError::NoSuchGroup(name.to_string()))?;
                Some((name.to_string(), gid))
            }
        };
        Ok(Access {
            owner_uid: sys::effective_uid(),
            group,
        })
    }

    /// Whether a peer with these credentials may use the socket. May call
    /// NSS: blocking.
    pub fn allows(&self, uid: u32, gid: u32) -> bool {
        self.allows_at_once(uid, gid).unwrap_or_else(|| {
            self.group
                .as_ref()
                .is_some_and(|(_, g)| sys::user_in_group(uid, gid, *g))
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
        sys::set_group(path, *gid).map_err(io_err)?;
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
        ErrorCode::Busy,
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
            ErrorCode::Unauthorized,
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
                    ErrorCode::TooLarge,
                    format!("request longer than {MAX_MESSAGE} bytes; the connection is closed"),
                );
                return send(&mut write, &resp).await;
            }
            Ok(Ok(LineRead::Line)) => match std::str::from_utf8(&line) {
                Err(_) => Response::error(ErrorCode::Malformed, "request is not UTF-8"),
                Ok(text) if text.trim().is_empty() => continue,
                Ok(text) => match parse_request(text.trim()) {
                    Err(resp) => resp,
                    Ok(cmd) => {
                        let (tx, rx) = oneshot::channel();
                        if calls.send((cmd, tx)).await.is_err() {
                            return Ok(()); // shutting down
                        }
                        rx.await.unwrap_or_else(|_| {
                            Response::error(ErrorCode::Internal, "the agent is shutting down")
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

/// Reads one `\n`-terminated line of at most `MAX_MESSAGE` bytes.
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
