//! The agents' channel as either end reads it: lines of a bounded size, and the connection
//! to a node's agent over TCP, under the cluster's TLS unless asked otherwise.

use std::{net::SocketAddr, pin::Pin, time::Duration};

use anyhow::{bail, Context as _, Result};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, BufReader};

use super::tls::{self, Identity};

/// The longest answer a host reads: an attach's carries every sighting (up to 2^20 each way,
/// a few hundred bytes each), a run's its events (some 80 bytes each as JSON).
pub const MAX_ANSWER: usize = 1 << 30;
/// How long a node's agent may take to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub type Read = Pin<Box<dyn AsyncRead + Send>>;
pub type Writer = Pin<Box<dyn AsyncWrite + Send>>;

/// A channel's lines, each at most `max` bytes: a peer cannot make this end hold more.
/// Cancel-safe: a line partly read when `next_line`'s future is dropped (a `select!` that took
/// another branch, a timeout) is kept and completed by the next call.
pub struct Reader {
    read: BufReader<Read>,
    max: usize,
    partial: Vec<u8>,
}

impl Reader {
    pub fn new(read: Read, max: usize) -> Reader {
        Reader {
            read: BufReader::new(read),
            max,
            partial: Vec::new(),
        }
    }

    /// The next line without its newline; None at the end of the stream.
    pub async fn next_line(&mut self) -> Result<Option<String>> {
        let limit = (self.max + 1).saturating_sub(self.partial.len()) as u64;
        let mut read = (&mut self.read).take(limit);
        match read.read_until(b'\n', &mut self.partial).await {
            Ok(0) if self.partial.is_empty() => return Ok(None),
            Ok(_) => {}
            // A peer gone without TLS's close_notify (a host that exited) has ended all the same.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let mut line = std::mem::take(&mut self.partial);
        if line.last() == Some(&b'\n') {
            line.pop();
        } else if line.len() > self.max {
            bail!("a line longer than {} bytes: refused", self.max);
        }
        Ok(Some(
            String::from_utf8(line).context("a line that is not UTF-8")?,
        ))
    }
}

/// The agent of node `node` at `addr`: under TLS as `identity` (its certificate must be for
/// `node`), or in the clear without one.
pub async fn dial(
    node: &str,
    addr: SocketAddr,
    identity: Option<&Identity>,
) -> Result<(Read, Writer)> {
    let cannot = || format!("cannot reach the agent of {node} at {addr}");
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {CONNECT_TIMEOUT:?}"))
        .with_context(cannot)?
        .with_context(cannot)?;
    let Some(id) = identity else {
        let (r, w) = tcp.into_split();
        return Ok((Box::pin(r), Box::pin(w)));
    };
    let stream = tls::connect(&id.connector()?, tcp, node)
        .await
        .with_context(cannot)?;
    let (r, w) = tokio::io::split(stream);
    Ok((Box::pin(r), Box::pin(w)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line is read whole up to the bound, refused past it, and the last one needs no newline.
    #[tokio::test]
    async fn lines_are_bounded() {
        let text = b"short\nexactly8\nnine byte\n".to_vec();
        let mut r = Reader::new(Box::pin(std::io::Cursor::new(text)), 8);
        assert_eq!(r.next_line().await.unwrap().as_deref(), Some("short"));
        assert_eq!(r.next_line().await.unwrap().as_deref(), Some("exactly8"));
        let e = r.next_line().await.unwrap_err();
        assert!(format!("{e}").contains("longer than 8 bytes"), "{e}");
        let mut r = Reader::new(Box::pin(std::io::Cursor::new(b"12345678".to_vec())), 8);
        assert_eq!(r.next_line().await.unwrap().as_deref(), Some("12345678"));
        assert_eq!(r.next_line().await.unwrap(), None);
    }

    /// A line that arrives in pieces across dropped calls (a select's other branch won) is read
    /// whole by the next call.
    #[tokio::test]
    async fn a_line_read_in_part_by_a_dropped_call_is_kept() {
        let (mut w, r) = tokio::io::duplex(64);
        let mut lines = Reader::new(Box::pin(r), 64);
        tokio::io::AsyncWriteExt::write_all(&mut w, b"first ha")
            .await
            .unwrap();
        let early = tokio::time::timeout(Duration::from_millis(50), lines.next_line()).await;
        assert!(
            early.is_err(),
            "a line without its end was returned: {early:?}"
        );
        tokio::io::AsyncWriteExt::write_all(&mut w, b"lf\nsecond\n")
            .await
            .unwrap();
        assert_eq!(
            lines.next_line().await.unwrap().as_deref(),
            Some("first half")
        );
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("second"));
    }
}
