//! Just enough HTTP/1.1 for the control API: one request per connection (request line,
//! headers, a `Content-Length` body), and responses with JSON bodies. No chunked bodies, no
//! keep-alive: every response says `Connection: close`, which every client honours.

use std::io::{self, Read, Write};

/// Longest request line plus headers we accept.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Largest request body we accept (the API's bodies are a few dozen bytes).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without any query string.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The client closed the connection before sending anything.
    #[error("connection closed before a request")]
    Closed,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("reading the request: {0}")]
    Io(#[from] io::Error),
}

impl HttpError {
    /// The status to answer with (none for a connection that closed or failed).
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Closed | HttpError::Io(_) => None,
            HttpError::Malformed(_) => Some(400),
            HttpError::TooLarge(_) => Some(413),
            HttpError::Unsupported(_) => Some(501),
        }
    }
}

fn malformed(what: impl Into<String>) -> HttpError {
    HttpError::Malformed(what.into())
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Reads one request from `stream`.
pub fn read_request(stream: &mut impl Read) -> Result<Request, HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_end = loop {
        let found = find_head_end(&buf);
        if found.unwrap_or(buf.len()) > MAX_HEAD_BYTES {
            return Err(HttpError::TooLarge(format!(
                "request line and headers exceed {MAX_HEAD_BYTES} bytes"
            )));
        }
        if let Some(end) = found {
            break end;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                HttpError::Closed
            } else {
                malformed("connection closed in the middle of the headers")
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| malformed("request head is not ASCII"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let parts: Vec<&str> = request_line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(malformed(format!(
            "request line `{request_line}` is not `METHOD PATH HTTP/1.1`"
        )));
    };
    if !is_token(method) {
        return Err(malformed(format!("method `{method}` is not a token")));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(malformed(format!(
            "unsupported protocol version `{version}`"
        )));
    }
    if !target.starts_with('/') {
        return Err(malformed(format!(
            "request target `{target}` is not an absolute path"
        )));
    }
    let path = target
        .split_once('?')
        .map_or(target, |(p, _)| p)
        .to_string();

    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| malformed(format!("header line `{line}` has no colon")))?;
        if !is_token(name) {
            return Err(malformed(format!("header name `{name}` is not a token")));
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
    let mut request = Request {
        method: method.to_string(),
        path,
        headers,
        body: Vec::new(),
    };
    if request.header("Transfer-Encoding").is_some() {
        return Err(HttpError::Unsupported(
            "Transfer-Encoding is not supported; send a Content-Length body".into(),
        ));
    }
    let mut length: Option<usize> = None;
    for (name, value) in &request.headers {
        if !name.eq_ignore_ascii_case("Content-Length") {
            continue;
        }
        let parsed: usize = value
            .parse()
            .ok()
            .filter(|_| value.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| malformed(format!("Content-Length `{value}` is not a number")))?;
        if length.is_some_and(|l| l != parsed) {
            return Err(malformed("conflicting Content-Length headers"));
        }
        length = Some(parsed);
    }
    let length = length.unwrap_or(0);
    if length > MAX_BODY_BYTES {
        return Err(HttpError::TooLarge(format!(
            "body of {length} bytes exceeds {MAX_BODY_BYTES}"
        )));
    }
    let mut body = buf[head_end + 4..].to_vec();
    if body.len() > length {
        // Pipelined requests are not supported; the extra bytes are ignored with the connection.
        body.truncate(length);
    }
    while body.len() < length {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(malformed(format!(
                "body ended after {} of {length} bytes",
                body.len()
            )));
        }
        let want = (length - body.len()).min(n);
        body.extend_from_slice(&chunk[..want]);
    }
    request.body = body;
    Ok(request)
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Content Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Writes a complete response; `body` is sent as `application/json`.
pub fn write_response(
    stream: &mut impl Write,
    status: u16,
    extra_headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> io::Result<()> {
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status));
    for (name, value) in extra_headers {
        out += &format!("{name}: {value}\r\n");
    }
    match body {
        Some(body) => {
            out += &format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            );
        }
        None if status != 204 => out += "Content-Length: 0\r\n",
        None => {}
    }
    out += "Connection: close\r\n\r\n";
    let mut bytes = out.into_bytes();
    if let Some(body) = body {
        bytes.extend_from_slice(body);
    }
    stream.write_all(&bytes)?;
    stream.flush()
}

/// A parsed response, for the client side (`kickvm remote`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Reads a response to the end of the connection (the server closes it).
pub fn read_response(stream: &mut impl Read) -> Result<Response, HttpError> {
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf)?;
    let head_end = find_head_end(&buf).ok_or_else(|| malformed("response has no header end"))?;
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| malformed("response head is not ASCII"))?;
    let status_line = head.split("\r\n").next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| malformed(format!("bad status line `{status_line}`")))?;
    let mut body = buf[head_end + 4..].to_vec();
    let length = head
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case("Content-Length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok());
    if let Some(length) = length {
        body.truncate(length);
    }
    Ok(Response { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Request, HttpError> {
        read_request(&mut raw.as_bytes())
    }

    #[test]
    fn a_put_with_a_body_is_parsed_with_headers_and_exact_body() {
        let req = parse(
            "PUT /api/v1/vm.device-ioeventfd?x=1 HTTP/1.1\r\nHost: localhost\r\n\
             content-length: 5\r\n\r\nhello",
        )
        .unwrap();
        assert_eq!(req.method, "PUT");
        assert_eq!(req.path, "/api/v1/vm.device-ioeventfd");
        assert_eq!(req.header("Host"), Some("localhost"));
        assert_eq!(req.body, b"hello");
    }

    #[test]
    fn a_body_split_across_reads_is_collected() {
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(3).min(out.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let raw = b"PUT /a HTTP/1.1\r\nContent-Length: 11\r\n\r\n{\"id\":\"x\"}\n";
        let req = read_request(&mut Trickle(raw)).unwrap();
        assert_eq!(req.body, b"{\"id\":\"x\"}\n");
    }

    #[test]
    fn malformed_request_lines_and_headers_are_rejected_as_400() {
        for raw in [
            "GET\r\n\r\n",
            "GET /a\r\n\r\n",
            "GET /a HTTP/2.0\r\n\r\n",
            "GET a HTTP/1.1\r\n\r\n",
            "G(T /a HTTP/1.1\r\n\r\n",
            "GET /a HTTP/1.1\r\nNoColon\r\n\r\n",
            "GET /a HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "GET /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            "PUT /a HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort",
            "GET /a HTTP/1.1\r\nHost: x",
        ] {
            let err = parse(raw).unwrap_err();
            assert_eq!(err.status(), Some(400), "{raw:?}: {err}");
        }
    }

    #[test]
    fn oversized_heads_and_bodies_are_413_and_chunked_is_501() {
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(MAX_HEAD_BYTES + 10));
        assert_eq!(parse(&long).unwrap_err().status(), Some(413));
        let big = format!(
            "PUT /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY_BYTES + 1
        );
        assert_eq!(parse(&big).unwrap_err().status(), Some(413));
        let chunked = "PUT /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(parse(chunked).unwrap_err().status(), Some(501));
    }

    #[test]
    fn an_empty_connection_is_closed_not_an_error_to_answer() {
        assert!(matches!(parse(""), Err(HttpError::Closed)));
    }

    #[test]
    fn responses_round_trip_through_the_client_parser() {
        let mut out = Vec::new();
        write_response(&mut out, 409, &[], Some(b"{\"error\":\"x\"}")).unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.starts_with("HTTP/1.1 409 Conflict\r\n"), "{text}");
        assert!(text.contains("Content-Type: application/json\r\n"));
        let parsed = read_response(&mut out.as_slice()).unwrap();
        assert_eq!(parsed.status, 409);
        assert_eq!(parsed.body, b"{\"error\":\"x\"}");
        let mut empty = Vec::new();
        write_response(&mut empty, 204, &[], None).unwrap();
        assert_eq!(read_response(&mut empty.as_slice()).unwrap().status, 204);
    }
}
