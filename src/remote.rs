//! `kickvm remote --api-socket PATH CMD`: the control API's client.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::api::http::{self, Response};
use crate::vmm::vcpu::ExitKind;

/// Pause waits for requests in flight (up to 10 s per device), so be patient.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteCommand {
    Info,
    Pause,
    Resume,
    Shutdown {
        timeout_secs: Option<u64>,
    },
    Kill,
    Ioeventfd {
        device: String,
        on: bool,
    },
    /// Counters as tables.
    Stats,
    /// Counters as the API's JSON.
    Counters,
    Snapshot {
        dir: std::path::PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("cannot reach the API socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("talking to the API: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad answer from the API: {0}")]
    Protocol(String),
    /// The API answered with an error status.
    #[error("{operation}: {message} (HTTP {status})")]
    Api {
        operation: String,
        status: u16,
        message: String,
    },
}

/// One request on a fresh connection.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<Response, RemoteError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| RemoteError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(RESPONSE_TIMEOUT))?;
    let body = body.unwrap_or("");
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    if !body.is_empty() || method == "PUT" {
        out += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
    }
    out += "\r\n";
    out += body;
    stream.write_all(out.as_bytes())?;
    http::read_response(&mut stream).map_err(|e| RemoteError::Protocol(e.to_string()))
}

fn call(
    socket: &Path,
    method: &str,
    operation: &str,
    body: Option<&str>,
) -> Result<Option<Value>, RemoteError> {
    let response = request(socket, method, &format!("/api/v1/{operation}"), body)?;
    let value: Option<Value> =
        if response.body.is_empty() {
            None
        } else {
            Some(serde_json::from_slice(&response.body).map_err(|e| {
                RemoteError::Protocol(format!("{operation}: body is not JSON: {e}"))
            })?)
        };
    if !(200..300).contains(&response.status) {
        let message = value
            .as_ref()
            .and_then(|v| v.get("error"))
            .and_then(Value::as_str)
            .unwrap_or("(no message)")
            .to_string();
        return Err(RemoteError::Api {
            operation: operation.to_string(),
            status: response.status,
            message,
        });
    }
    Ok(value)
}

fn pretty(value: &Option<Value>) -> String {
    value
        .as_ref()
        .map(|v| serde_json::to_string_pretty(v).expect("JSON values serialise"))
        .unwrap_or_default()
}

/// Runs `command`; returns what to print on stdout.
pub fn run(socket: &Path, command: &RemoteCommand) -> Result<String, RemoteError> {
    Ok(match command {
        RemoteCommand::Info => pretty(&call(socket, "GET", "vm.info", None)?),
        RemoteCommand::Counters => pretty(&call(socket, "GET", "vm.counters", None)?),
        RemoteCommand::Stats => {
            let counters = call(socket, "GET", "vm.counters", None)?
                .ok_or_else(|| RemoteError::Protocol("vm.counters: empty body".into()))?;
            stats_tables(&counters)
        }
        RemoteCommand::Pause => {
            call(socket, "PUT", "vm.pause", None)?;
            String::new()
        }
        RemoteCommand::Resume => {
            call(socket, "PUT", "vm.resume", None)?;
            String::new()
        }
        RemoteCommand::Shutdown { timeout_secs } => {
            let body =
                timeout_secs.map(|secs| serde_json::json!({ "timeout_secs": secs }).to_string());
            call(socket, "PUT", "vm.shutdown", body.as_deref())?;
            String::new()
        }
        RemoteCommand::Kill => {
            call(socket, "PUT", "vm.kill", None)?;
            String::new()
        }
        RemoteCommand::Snapshot { dir } => {
            // The VM may run in another directory: it is given an absolute path.
            let dir = std::path::absolute(dir).map_err(|e| {
                RemoteError::Protocol(format!("snapshot directory {}: {e}", dir.display()))
            })?;
            let url = format!("file://{}", dir.display());
            let body = serde_json::json!({ "destination_url": url }).to_string();
            call(socket, "PUT", "vm.snapshot", Some(&body))?;
            String::new()
        }
        RemoteCommand::Ioeventfd { device, on } => {
            let body = serde_json::json!({
                "id": device,
                "ioeventfd": if *on { "on" } else { "off" },
            })
            .to_string();
            let info = call(socket, "PUT", "vm.device-ioeventfd", Some(&body))?;
            queue_modes(info.as_ref().unwrap_or(&Value::Null))
        }
    })
}

/// `disk0 queue 0: ioeventfd` lines for a device's info.
fn queue_modes(device: &Value) -> String {
    let id = device["id"].as_str().unwrap_or("?");
    let mut out = String::new();
    for queue in device["queues"].as_array().into_iter().flatten() {
        out += &format!(
            "{id} queue {}: {}\n",
            queue["index"],
            queue["detail"].as_str().unwrap_or("?")
        );
    }
    out
}

fn number(v: &Value) -> String {
    v.as_u64()
        .map_or_else(|| "-".to_string(), |n| n.to_string())
}

/// Left-aligned first column(s), right-aligned numbers.
fn table(header: &[&str], rows: &[Vec<String>], text_columns: usize) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let formatted: Vec<String> = cells
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (cell, &w))| {
                if i < text_columns {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        formatted.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out += &line(row.iter().map(String::as_str).collect());
    }
    out
}

/// `kickvm remote stats`: one table of vCPU exits, one of queue counters.
pub fn stats_tables(counters: &Value) -> String {
    let mut header = vec!["vcpu"];
    header.extend(ExitKind::ALL.iter().map(|k| k.name()));
    let vcpu_rows: Vec<Vec<String>> = counters["vcpus"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|vcpu| {
            let mut row = vec![number(&vcpu["index"])];
            row.extend(
                ExitKind::ALL
                    .iter()
                    .map(|k| number(&vcpu["exits"][k.name()])),
            );
            row
        })
        .collect();
    let fields = [
        "kicks_ioeventfd",
        "kicks_exit",
        "kicks_replayed",
        "requests",
        "bytes",
        "interrupts_sent",
        "interrupts_suppressed",
    ];
    let mut queue_header = vec!["device", "queue", "notify"];
    queue_header.extend(fields);
    queue_header.push("interrupts");
    let mut queue_rows = Vec::new();
    for device in counters["devices"].as_array().into_iter().flatten() {
        for queue in device["queues"].as_array().into_iter().flatten() {
            let mut row = vec![
                device["id"].as_str().unwrap_or("?").to_string(),
                number(&queue["index"]),
                queue["notify"].as_str().unwrap_or("?").to_string(),
            ];
            row.extend(fields.iter().map(|f| number(&queue[*f])));
            row.push(queue["interrupts"].as_str().unwrap_or("?").to_string());
            queue_rows.push(row);
        }
    }
    let mut out = table(&header, &vcpu_rows, 0);
    out += "\n";
    if queue_rows.is_empty() {
        out += "(no devices)\n";
    } else {
        out += &table(&queue_header, &queue_rows, 3);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stats_print_one_row_per_vcpu_and_per_queue_with_aligned_columns() {
        let counters = json!({
            "vcpus": [
                {"index": 0, "exits": {"io_out": 12345, "mmio_write": 7}},
                {"index": 1, "exits": {"io_out": 1}},
            ],
            "devices": [{"id": "disk0", "queues": [
                {"index": 0, "notify": "ioeventfd", "kicks_ioeventfd": 40, "kicks_exit": 2,
                 "kicks_replayed": 1, "requests": 41, "bytes": 167936,
                 "interrupts_sent": 0, "interrupts_suppressed": 0, "interrupts": "direct"}
            ]}]
        });
        let text = stats_tables(&counters);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("vcpu  io_in  io_out"), "{text}");
        assert!(lines[1].contains("12345"), "{text}");
        let disk = lines.iter().find(|l| l.starts_with("disk0")).unwrap();
        assert!(
            disk.contains("ioeventfd") && disk.contains("167936") && disk.ends_with("direct"),
            "{text}"
        );
        // Numbers are right-aligned under their headers.
        let header = lines.iter().find(|l| l.starts_with("device")).unwrap();
        assert_eq!(
            header.find("bytes").unwrap() + "bytes".len(),
            disk.find("167936").unwrap() + "167936".len()
        );
    }
}
