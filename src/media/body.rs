//! Streaming file responses and HTTP Range parsing (RFC 9110 §14).

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::task::JoinHandle;

/// Bytes read from disk per step.
const CHUNK: u64 = 256 * 1024;

/// Most ranges served in one multipart response; more and the whole file
/// is sent instead (RFC 9110 allows ignoring Range).
pub const MAX_RANGES: usize = 16;

/// A piece of a response body.
#[derive(Debug)]
pub enum Part {
    Bytes(Bytes),
    File { offset: u64, len: u64 },
}

/// A response body read from a file in chunks on the blocking pool; a
/// blocking thread is held only while a chunk is being read, never while
/// the client is slow.
pub struct FileBody {
    file: Arc<std::fs::File>,
    parts: VecDeque<Part>,
    pending: Option<JoinHandle<io::Result<Vec<u8>>>>,
    remaining: u64,
}

impl FileBody {
    pub fn new(file: std::fs::File, parts: Vec<Part>) -> FileBody {
        let remaining = parts
            .iter()
            .map(|p| match p {
                Part::Bytes(b) => b.len() as u64,
                Part::File { len, .. } => *len,
            })
            .sum();
        FileBody { file: Arc::new(file), parts: parts.into(), pending: None, remaining }
    }
}

fn read_at(file: &std::fs::File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    #[cfg(unix)]
    std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, offset)?;
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek};
        let mut f = file;
        f.seek(io::SeekFrom::Start(offset))?;
        f.read_exact(&mut buf)?;
    }
    Ok(buf)
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(h) = this.pending.as_mut() {
                let r = ready!(Pin::new(h).poll(cx));
                this.pending = None;
                let buf = match r {
                    Ok(Ok(b)) => b,
                    Ok(Err(e)) => return Poll::Ready(Some(Err(e))),
                    Err(e) => return Poll::Ready(Some(Err(io::Error::other(e)))),
                };
                let n = buf.len() as u64;
                if let Some(Part::File { offset, len }) = this.parts.front_mut() {
                    *offset += n;
                    *len = len.saturating_sub(n);
                }
                this.remaining = this.remaining.saturating_sub(n);
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))));
            }
            match this.parts.front_mut() {
                None => return Poll::Ready(None),
                Some(Part::Bytes(_)) => {
                    if let Some(Part::Bytes(b)) = this.parts.pop_front() {
                        this.remaining = this.remaining.saturating_sub(b.len() as u64);
                        return Poll::Ready(Some(Ok(Frame::data(b))));
                    }
                }
                Some(Part::File { len: 0, .. }) => {
                    this.parts.pop_front();
                }
                Some(Part::File { offset, len }) => {
                    let (off, n) = (*offset, (*len).min(CHUNK) as usize);
                    let f = this.file.clone();
                    this.pending = Some(tokio::task::spawn_blocking(move || read_at(&f, off, n)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0 && self.pending.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// What a Range header asks of a representation of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable Range: send everything.
    Full,
    /// Inclusive byte ranges, each within the file.
    Partial(Vec<(u64, u64)>),
    /// Syntactically valid but no range overlaps the file: 416.
    Unsatisfiable,
}

/// Parses a `Range` header value for a file of `len` bytes. Invalid
/// syntax, other units, and more than [`MAX_RANGES`] ranges are ignored
/// (the whole file is sent), as RFC 9110 permits.
pub fn parse_range(h: &str, len: u64) -> RangeRequest {
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeRequest::Full;
    };
    let mut out = Vec::new();
    let mut count = 0;
    for part in spec.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        count += 1;
        if count > MAX_RANGES {
            return RangeRequest::Full;
        }
        let Some((a, b)) = part.split_once('-') else {
            return RangeRequest::Full;
        };
        let (a, b) = (a.trim(), b.trim());
        let num = |s: &str| -> Option<u64> {
            if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) { None } else { s.parse().ok() }
        };
        let r = if a.is_empty() {
            // Suffix: the last `b` bytes.
            let Some(n) = num(b) else {
                return RangeRequest::Full;
            };
            if n == 0 || len == 0 {
                continue;
            }
            Some((len.saturating_sub(n), len - 1))
        } else {
            let Some(start) = num(a) else {
                return RangeRequest::Full;
            };
            let end = if b.is_empty() {
                u64::MAX
            } else {
                match num(b) {
                    Some(e) if e >= start => e,
                    _ => return RangeRequest::Full,
                }
            };
            (start < len).then(|| (start, end.min(len - 1)))
        };
        if let Some(r) = r {
            out.push(r);
        }
    }
    if count == 0 {
        RangeRequest::Full
    } else if out.is_empty() {
        RangeRequest::Unsatisfiable
    } else {
        RangeRequest::Partial(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn ranges() {
        use RangeRequest::*;
        assert_eq!(parse_range("bytes=0-499", 1000), Partial(vec![(0, 499)]));
        assert_eq!(parse_range("bytes=500-", 1000), Partial(vec![(500, 999)]));
        assert_eq!(parse_range("bytes=-100", 1000), Partial(vec![(900, 999)]));
        assert_eq!(parse_range("bytes=-5000", 1000), Partial(vec![(0, 999)]));
        assert_eq!(parse_range("bytes=0-0, 10-2000", 1000), Partial(vec![(0, 0), (10, 999)]));
        assert_eq!(parse_range("bytes=1000-", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=5-1", 1000), Full);
        assert_eq!(parse_range("items=0-1", 1000), Full);
        assert_eq!(parse_range("bytes=a-b", 1000), Full);
        assert_eq!(parse_range("bytes=+1-2", 1000), Full);
        assert_eq!(parse_range("bytes=", 1000), Full);
        assert_eq!(parse_range("bytes=0-18446744073709551616", 1000), Full);
        let many = format!("bytes={}", (0..20).map(|i| format!("{i}-{i}")).collect::<Vec<_>>().join(","));
        assert_eq!(parse_range(&many, 1000), Full);
    }

    #[tokio::test]
    async fn file_body_streams_parts() {
        let p = std::env::temp_dir().join(format!("chatd-body-{}", std::process::id()));
        let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let body = FileBody::new(
            f,
            vec![
                Part::Bytes(Bytes::from_static(b"<")),
                Part::File { offset: 10, len: 300_000 },
                Part::Bytes(Bytes::from_static(b">")),
                Part::File { offset: 599_990, len: 10 },
            ],
        );
        assert_eq!(http_body::Body::size_hint(&body).exact(), Some(300_012));
        let got = body.collect().await.unwrap().to_bytes();
        let mut want = b"<".to_vec();
        want.extend_from_slice(&data[10..300_010]);
        want.push(b'>');
        want.extend_from_slice(&data[599_990..]);
        assert!(got[..] == want[..]);
        let _ = std::fs::remove_file(p);
    }
}
