//! The response side of the handler contract: stdout is the response. When it starts with a CGI
//! header block (`Name: value` lines, then an empty line), the block gives the status (`Status:
//! 404 Not Found`) and headers; otherwise all of stdout is the body, with status 200 and
//! `content-type: text/plain; charset=utf-8`.

use super::{FailureReason, Response};

/// Longest header block accepted.
pub const MAX_HEADER_BLOCK: usize = 16 * 1024;

fn is_token(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Where the header block ends: (end of the block, start of the body), if stdout has one.
fn split(out: &[u8]) -> Option<(usize, usize)> {
    let window = &out[..out.len().min(MAX_HEADER_BLOCK + 4)];
    let mut line_start = 0;
    let mut i = 0;
    while i < window.len() {
        if window[i] == b'\n' {
            let line = &window[line_start..i];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                return if line_start == 0 { None } else { Some((line_start, i + 1)) };
            }
            // Every line before the blank one must be a header, or there is no header block.
            let text = std::str::from_utf8(line).ok()?;
            let (name, _) = text.split_once(':')?;
            if !is_token(name) {
                return None;
            }
            line_start = i + 1;
        }
        i += 1;
    }
    None
}

/// The head of a response whose stdout starts with `out`, once it is known: the status and
/// headers (a failure when the block is invalid) and where the body starts. Known when the
/// header block is complete, or when `out` is longer than a block can be and holds none.
pub fn head(out: &[u8]) -> Option<(Response, usize)> {
    match split(out) {
        Some((_, body_start)) => Some((parse(out[..body_start].to_vec()), body_start)),
        None if out.len() > MAX_HEADER_BLOCK + 4 => Some((parse(Vec::new()), 0)),
        None => None,
    }
}

/// Turns stdout into the response.
pub fn parse(out: Vec<u8>) -> Response {
    let Some((block_end, body_start)) = split(&out) else {
        return Response {
            status: 200,
            headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
            body: out,
            failure: None,
        };
    };
    let block = String::from_utf8_lossy(&out[..block_end]).into_owned();
    let mut status = 200;
    let mut headers = Vec::new();
    let mut has_type = false;
    for line in block.lines() {
        let Some((name, value)) = line.split_once(':') else { continue };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_owned());
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Response::failed(FailureReason::InvalidResponse, format!("header {name} has control characters"));
        }
        match name.as_str() {
            "status" => match value.split_whitespace().next().and_then(|s| s.parse::<u16>().ok()) {
                Some(code @ 100..=599) => status = code,
                _ => {
                    return Response::failed(
                        FailureReason::InvalidResponse,
                        format!("Status must start with a code from 100 to 599, not {value:?}"),
                    );
                }
            },
            // Framing is the platform's business.
            "content-length" | "transfer-encoding" | "connection" => {}
            _ => {
                has_type |= name == "content-type";
                headers.push((name, value));
            }
        }
    }
    if !has_type {
        headers.push(("content-type".into(), "text/plain; charset=utf-8".into()));
    }
    Response { status, headers, body: out[body_start..].to_vec(), failure: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_block_sets_status_and_headers() {
        let r =
            parse(b"Status: 201 Created\r\nContent-Type: application/json\r\nX-Thing: 1\r\n\r\n{\"ok\":true}".to_vec());
        assert_eq!(r.status, 201);
        assert_eq!(r.headers, vec![("content-type".into(), "application/json".into()), ("x-thing".into(), "1".into())]);
        assert_eq!(r.body, b"{\"ok\":true}");
        let r = parse(b"Content-Type: text/html\n\n<p>hi</p>\n".to_vec());
        assert_eq!((r.status, r.body.as_slice()), (200, &b"<p>hi</p>\n"[..]));
    }

    #[test]
    fn without_a_header_block_all_of_stdout_is_the_body() {
        for out in [&b"hello world\n"[..], b"not: a header\nbut then text\n", b"", b"\nleading blank line"] {
            let r = parse(out.to_vec());
            assert_eq!((r.status, r.body.as_slice()), (200, out), "{:?}", String::from_utf8_lossy(out));
            assert_eq!(r.headers, vec![("content-type".into(), "text/plain; charset=utf-8".into())]);
        }
    }

    #[test]
    fn bad_status_lines_are_invalid_responses_and_framing_headers_are_dropped() {
        let r = parse(b"Status: 99 Nope\n\nbody".to_vec());
        assert_eq!(r.failure, Some(FailureReason::InvalidResponse));
        assert_eq!(r.status, 502);
        let r = parse(b"Content-Length: 999\nTransfer-Encoding: chunked\n\nbody".to_vec());
        assert_eq!(r.headers, vec![("content-type".into(), "text/plain; charset=utf-8".into())]);
        assert_eq!(r.body, b"body");
    }
}
