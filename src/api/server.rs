//! The control API's server: a unix socket (owner-only, removed at exit), served by its own
//! thread. The thread parses and routes each request; requests that malformed or unknown
//! input makes impossible are answered there, without touching the VM. The rest become a
//! [`VmAction`] handed to the main thread (which owns the run state) through a channel and an
//! eventfd, and the thread waits for its [`ApiResponse`]. vCPU threads are never involved
//! except through the pause barrier.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Map, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::http::{self, HttpError, Request};

/// How long a client may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the main thread is asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmAction {
    Info,
    Counters,
    Pause,
    Resume,
    /// Press the ACPI power button; with a grace period, end the VM if the guest has not
    /// powered off by then.
    Shutdown {
        grace: Option<Duration>,
    },
    Kill,
    /// Write a snapshot of the paused VM into a directory.
    Snapshot {
        dir: std::path::PathBuf,
    },
    SetIoeventfd {
        id: String,
        on: bool,
    },
}

/// An HTTP status with an optional JSON body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Option<Value>,
}

impl ApiResponse {
    pub fn ok(body: Value) -> Self {
        Self {
            status: 200,
            body: Some(body),
        }
    }

    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            body: Some(json!({ "error": message.into() })),
        }
    }
}

/// A routed request waiting for the main thread.
pub struct PendingRequest {
    pub action: VmAction,
    reply: Sender<ApiResponse>,
}

impl PendingRequest {
    pub fn respond(self, response: ApiResponse) {
        // The client may have gone away; nothing to do then.
        let _ = self.reply.send(response);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiSocketError {
    #[error("--api-socket {path}: another process is serving this socket")]
    InUse { path: PathBuf },
    #[error("--api-socket {path}: a file that is not a socket is in the way")]
    NotASocket { path: PathBuf },
    #[error("--api-socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

pub struct ApiServer {
    path: PathBuf,
    requests: Option<Receiver<PendingRequest>>,
    wake: Arc<EventFd>,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Creates the socket (mode 0600; a stale socket nobody serves is replaced) and starts the
    /// server thread. Call before other threads exist: the socket is created under a umask.
    pub fn bind(path: &Path) -> Result<Self, ApiSocketError> {
        let io_err = |source| ApiSocketError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(ApiSocketError::NotASocket {
                    path: path.to_path_buf(),
                });
            }
            if UnixStream::connect(path).is_ok() {
                return Err(ApiSocketError::InUse {
                    path: path.to_path_buf(),
                });
            }
            std::fs::remove_file(path).map_err(io_err)?;
        }
        // SAFETY: umask only changes this process's file creation mask; it is restored right
        // after bind, before any other thread of ours creates files.
        let old_mask = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old_mask) };
        let listener = bound.map_err(io_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;

        let (sender, requests) = mpsc::channel();
        let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(io_err)?);
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(io_err)?);
        let server = Server {
            listener,
            sender,
            wake: wake.clone(),
            stop: stop.clone(),
            connections: Arc::new(AtomicUsize::new(0)),
        };
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || server.run())
            .map_err(io_err)?;
        log::info!("control API on {}", path.display());
        Ok(Self {
            path: path.to_path_buf(),
            requests: Some(requests),
            wake,
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Readable when requests wait for the main thread.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// The requests waiting now (after the wake fd became readable).
    pub fn take_requests(&self) -> Vec<PendingRequest> {
        let _ = self.wake.read();
        self.requests
            .as_ref()
            .map(|r| r.try_iter().collect())
            .unwrap_or_default()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // Dropping the receiver first makes a request in progress fail fast (503) rather than
        // wait for a main thread that is gone.
        self.requests.take();
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::warn!("cannot remove the API socket {}: {e}", self.path.display());
        }
    }
}

/// Connections served at once; beyond this a client gets 503 at once. Each has its own thread,
/// so a client that is slow to send its request holds up no other.
const MAX_CONNECTIONS: usize = 16;

struct Server {
    listener: UnixListener,
    sender: Sender<PendingRequest>,
    wake: Arc<EventFd>,
    stop: Arc<EventFd>,
    connections: Arc<AtomicUsize>,
}

/// One connection's side of the server: what its thread needs to route a request to the main
/// thread.
#[derive(Clone)]
struct Connection {
    sender: Sender<PendingRequest>,
    wake: Arc<EventFd>,
}

impl Server {
    fn run(self) {
        // The API thread starts before the VM blocks these (ApiServer::bind comes first).
        crate::vmm::block_control_signals();
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.listener.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("control API: poll failed: {e}; the API stops");
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            if fds[0].revents != 0 {
                match self.listener.accept() {
                    Ok((stream, _)) => self.spawn_connection(stream),
                    Err(e) => log::warn!("control API: accept failed: {e}"),
                }
            }
        }
    }

    fn spawn_connection(&self, mut stream: UnixStream) {
        if self.connections.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
            let body = json!({ "error": "too many API connections at once" });
            let body = serde_json::to_vec(&body).expect("JSON values serialise");
            let _ = http::write_response(&mut stream, 503, &[], Some(&body));
            return;
        }
        let connection = Connection {
            sender: self.sender.clone(),
            wake: self.wake.clone(),
        };
        let count = self.connections.clone();
        let spawned = std::thread::Builder::new()
            .name("kickvm-api-conn".into())
            .spawn(move || {
                connection.serve(stream);
                count.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            log::warn!("control API: cannot start a connection thread: {e}");
        }
    }
}

impl Connection {
    fn serve(&self, mut stream: UnixStream) {
        let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
        let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
        let response = match http::read_request(&mut stream) {
            Ok(request) => {
                log::debug!("control API: {} {}", request.method, request.path);
                match route(&request) {
                    Ok(action) => self.ask_main_thread(action),
                    Err(response) => response,
                }
            }
            Err(HttpError::Closed) => return,
            Err(e) => match e.status() {
                Some(status) => ApiResponse::error(status, e.to_string()),
                None => {
                    log::debug!("control API: {e}");
                    return;
                }
            },
        };
        let body = response
            .body
            .as_ref()
            .map(|b| serde_json::to_vec(b).expect("JSON values serialise"));
        if let Err(e) = http::write_response(&mut stream, response.status, &[], body.as_deref()) {
            log::debug!("control API: writing the response: {e}");
        }
    }

    fn ask_main_thread(&self, action: VmAction) -> ApiResponse {
        let (reply, answer) = mpsc::channel();
        if self.sender.send(PendingRequest { action, reply }).is_err() {
            return ApiResponse::error(503, "the VM is shutting down");
        }
        let _ = self.wake.write(1);
        answer
            .recv()
            .unwrap_or_else(|_| ApiResponse::error(503, "the VM is shutting down"))
    }
}

const API_PREFIX: &str = "/api/v1/";

/// Maps a request to an action, or to the error that answers it.
pub fn route(request: &Request) -> Result<VmAction, ApiResponse> {
    let Some(operation) = request.path.strip_prefix(API_PREFIX) else {
        return Err(ApiResponse::error(
            404,
            format!("no such path `{}`", request.path),
        ));
    };
    let (method, action) = match operation {
        "vm.info" => ("GET", VmAction::Info),
        "vm.counters" => ("GET", VmAction::Counters),
        "vm.pause" => ("PUT", VmAction::Pause),
        "vm.resume" => ("PUT", VmAction::Resume),
        "vm.shutdown" => ("PUT", parse_shutdown_body(request)?),
        "vm.kill" => ("PUT", VmAction::Kill),
        "vm.device-ioeventfd" => ("PUT", parse_ioeventfd_body(request)?),
        "vm.snapshot" => ("PUT", parse_snapshot_body(request)?),
        _ => {
            return Err(ApiResponse::error(
                404,
                format!("no such operation `{operation}`"),
            ))
        }
    };
    // The method is checked first so a GET of device-ioeventfd is 405, not a body error.
    if request.method != method {
        return Err(ApiResponse::error(
            405,
            format!(
                "{} does not take {}; use {method}",
                request.path, request.method
            ),
        ));
    }
    Ok(action)
}

/// The longest grace period `vm.shutdown` accepts (a day): beyond it, a typo is likelier.
const MAX_SHUTDOWN_GRACE_SECS: u64 = 86_400;

fn bad_request(message: String) -> ApiResponse {
    ApiResponse::error(400, message)
}

/// The JSON object body of a PUT that may hold only `fields` (the method is checked first,
/// so a GET with a body is 405, not a body error).
fn put_body_object(request: &Request, fields: &[&str]) -> Result<Map<String, Value>, ApiResponse> {
    if request.method != "PUT" {
        return Err(ApiResponse::error(
            405,
            format!("{} does not take {}; use PUT", request.path, request.method),
        ));
    }
    let value: Value = serde_json::from_slice(&request.body)
        .map_err(|e| bad_request(format!("body is not JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(bad_request("body must be a JSON object".into()));
    };
    if let Some(key) = object.keys().find(|k| !fields.contains(&k.as_str())) {
        let expected: Vec<String> = fields.iter().map(|f| format!("`{f}`")).collect();
        return Err(bad_request(format!(
            "unknown field `{key}` (expected {})",
            expected.join(" and ")
        )));
    }
    Ok(object)
}

/// `vm.shutdown` takes no body, or `{"timeout_secs": N}`.
fn parse_shutdown_body(request: &Request) -> Result<VmAction, ApiResponse> {
    if request.method == "PUT" && request.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(VmAction::Shutdown { grace: None });
    }
    let object = put_body_object(request, &["timeout_secs"])?;
    let grace = match object.get("timeout_secs") {
        None | Some(Value::Null) => None,
        Some(value) => match value.as_u64() {
            Some(secs) if secs <= MAX_SHUTDOWN_GRACE_SECS => Some(Duration::from_secs(secs)),
            _ => {
                return Err(bad_request(format!(
                    "`timeout_secs` must be a whole number of seconds from 0 to \
                     {MAX_SHUTDOWN_GRACE_SECS}, not {value}"
                )))
            }
        },
    };
    Ok(VmAction::Shutdown { grace })
}

/// `vm.snapshot` takes `{"destination_url": "file:///DIR"}` (cloud-hypervisor's body).
fn parse_snapshot_body(request: &Request) -> Result<VmAction, ApiResponse> {
    let object = put_body_object(request, &["destination_url"])?;
    let url = object
        .get("destination_url")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_request("`destination_url` (\"file:///DIR\") is required".into()))?;
    match url.strip_prefix("file://") {
        Some(dir) if dir.starts_with('/') => Ok(VmAction::Snapshot { dir: dir.into() }),
        _ => Err(bad_request(format!(
            "`destination_url` must be a file:// URL of an absolute directory, not `{url}`"
        ))),
    }
}

fn parse_ioeventfd_body(request: &Request) -> Result<VmAction, ApiResponse> {
    let object = put_body_object(request, &["id", "ioeventfd"])?;
    let id = object
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| bad_request("`id` (a device id string) is required".into()))?;
    let on = match object.get("ioeventfd") {
        Some(Value::String(s)) if s == "on" => true,
        Some(Value::String(s)) if s == "off" => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(bad_request(format!(
                "`ioeventfd` must be \"on\" or \"off\", not {other}"
            )))
        }
        None => {
            return Err(bad_request(
                "`ioeventfd` (\"on\" or \"off\") is required".into(),
            ))
        }
    };
    Ok(VmAction::SetIoeventfd {
        id: id.to_string(),
        on,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn status(method: &str, path: &str, body: &str) -> u16 {
        route(&request(method, path, body)).unwrap_err().status
    }

    #[test]
    fn each_operation_routes_with_its_method() {
        let ok = |m, p| route(&request(m, p, "")).unwrap();
        assert_eq!(ok("GET", "/api/v1/vm.info"), VmAction::Info);
        assert_eq!(ok("GET", "/api/v1/vm.counters"), VmAction::Counters);
        assert_eq!(ok("PUT", "/api/v1/vm.pause"), VmAction::Pause);
        assert_eq!(ok("PUT", "/api/v1/vm.resume"), VmAction::Resume);
        assert_eq!(
            ok("PUT", "/api/v1/vm.shutdown"),
            VmAction::Shutdown { grace: None }
        );
        assert_eq!(
            route(&request(
                "PUT",
                "/api/v1/vm.shutdown",
                r#"{"timeout_secs": 30}"#
            ))
            .unwrap(),
            VmAction::Shutdown {
                grace: Some(Duration::from_secs(30))
            }
        );
        assert_eq!(ok("PUT", "/api/v1/vm.kill"), VmAction::Kill);
        assert_eq!(
            route(&request(
                "PUT",
                "/api/v1/vm.device-ioeventfd",
                r#"{"id": "disk0", "ioeventfd": "off"}"#
            ))
            .unwrap(),
            VmAction::SetIoeventfd {
                id: "disk0".into(),
                on: false
            }
        );
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405() {
        assert_eq!(status("GET", "/api/v1/vm.nothing", ""), 404);
        assert_eq!(status("GET", "/", ""), 404);
        assert_eq!(status("PUT", "/api/v1/vm.info", ""), 405);
        assert_eq!(status("GET", "/api/v1/vm.pause", ""), 405);
        assert_eq!(status("GET", "/api/v1/vm.device-ioeventfd", ""), 405);
        assert_eq!(status("GET", "/api/v1/vm.shutdown", "{\"x\": 1}"), 405);
    }

    #[test]
    fn bad_ioeventfd_bodies_are_400() {
        let path = "/api/v1/vm.device-ioeventfd";
        for body in [
            "",
            "not json",
            "[1]",
            r#"{"ioeventfd": "on"}"#,
            r#"{"id": 3, "ioeventfd": "on"}"#,
            r#"{"id": "disk0"}"#,
            r#"{"id": "disk0", "ioeventfd": "maybe"}"#,
            r#"{"id": "disk0", "ioeventfd": "on", "extra": 1}"#,
        ] {
            assert_eq!(status("PUT", path, body), 400, "{body}");
        }
    }

    #[test]
    fn a_snapshot_takes_a_file_url_of_an_absolute_directory() {
        let path = "/api/v1/vm.snapshot";
        assert_eq!(
            route(&request(
                "PUT",
                path,
                r#"{"destination_url": "file:///var/snap"}"#
            ))
            .unwrap(),
            VmAction::Snapshot {
                dir: "/var/snap".into()
            }
        );
        for body in [
            "",
            r#"{"destination_url": "/var/snap"}"#,
            r#"{"destination_url": "file://relative"}"#,
            r#"{"destination_url": "http://host/snap"}"#,
            r#"{"destination_url": "file:///a", "more": 1}"#,
        ] {
            assert_eq!(status("PUT", path, body), 400, "{body}");
        }
        assert_eq!(status("GET", path, ""), 405);
    }

    #[test]
    fn bad_shutdown_bodies_are_400() {
        let path = "/api/v1/vm.shutdown";
        for body in [
            "not json",
            "[1]",
            r#"{"timeout_secs": -1}"#,
            r#"{"timeout_secs": 1.5}"#,
            r#"{"timeout_secs": "10"}"#,
            r#"{"timeout_secs": 86401}"#,
            r#"{"timeout": 10}"#,
        ] {
            assert_eq!(status("PUT", path, body), 400, "{body}");
        }
    }
}
