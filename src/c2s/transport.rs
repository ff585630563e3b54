//! The byte streams a client connection runs over: plain TCP, TLS (direct
//! or after STARTTLS, over TCP or any other stream), and any other
//! bidirectional stream (an in-process pipe in tests, a WebSocket
//! adapter). The connection task sees only [`Transport`], so the session
//! code is the same whatever carries the bytes.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::protocol::Framer;

/// A bidirectional byte stream a connection can run over.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// The connection's stream in its current state.
pub(crate) enum Transport {
    /// Plain TCP. Kept concrete so an idle connection can wait for
    /// readability without holding a read buffer.
    Tcp(TcpStream),
    /// TLS over whatever stream the connection started on.
    Tls(Box<TlsStream<Box<dyn Stream>>>),
    /// Any other stream, read into the framer's buffer directly.
    Other(Box<dyn Stream>),
    /// Taken for a TLS handshake that failed: reads see EOF, writes
    /// vanish.
    Gone,
}

impl Transport {
    /// Reads once into the framer's buffer. Cancel-safe. Plain TCP waits
    /// for readability without holding any buffer.
    pub(crate) async fn read_into(&mut self, framer: &mut Framer) -> std::io::Result<usize> {
        match self {
            Transport::Tcp(s) => loop {
                s.readable().await?;
                match s.try_read_buf(framer.read_buffer()) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            },
            Transport::Tls(s) => s.read_buf(framer.read_buffer()).await,
            Transport::Other(s) => s.read_buf(framer.read_buffer()).await,
            Transport::Gone => Ok(0),
        }
    }

    /// Writes all of `data` and flushes it to the peer.
    pub(crate) async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Transport::Tcp(s) => s.write_all(data).await,
            Transport::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Transport::Other(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Transport::Gone => Ok(()),
        }
    }

    pub(crate) async fn shutdown(&mut self) {
        let _ = match self {
            Transport::Tcp(s) => s.shutdown().await,
            Transport::Tls(s) => s.shutdown().await,
            Transport::Other(s) => s.shutdown().await,
            Transport::Gone => Ok(()),
        };
    }

    /// Runs the server side of a TLS handshake on this stream, within
    /// `timeout`. On success returns the TLS transport and its TLS 1.3
    /// exporter channel binding (`None` on TLS 1.2); on failure the
    /// stream is dropped (`self` is [`Transport::Gone`] either way).
    pub(crate) async fn accept_tls(
        &mut self,
        acceptor: tokio_rustls::TlsAcceptor,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, String> {
        let inner: Box<dyn Stream> = match std::mem::replace(self, Transport::Gone) {
            Transport::Tcp(s) => Box::new(s),
            Transport::Other(s) => s,
            Transport::Tls(_) | Transport::Gone => return Err("TLS already active".into()),
        };
        match tokio::time::timeout(timeout, acceptor.accept(inner)).await {
            Ok(Ok(tls)) => {
                let (_, conn) = tls.get_ref();
                let mut exporter = None;
                if conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
                    let mut buf = vec![0u8; 32];
                    if conn.export_keying_material(&mut buf[..], b"EXPORTER-Channel-Binding", None).is_ok() {
                        exporter = Some(buf);
                    }
                }
                *self = Transport::Tls(Box::new(tls));
                Ok(exporter)
            }
            Ok(Err(e)) => Err(format!("TLS handshake failed: {e}")),
            Err(_) => Err("TLS handshake timed out".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use base64::Engine;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use crate::protocol::{Element, Frame, Framer};
    use crate::server::Server;
    use crate::storage::Stores;

    async fn next(io: &mut DuplexStream, f: &mut Framer) -> Frame {
        loop {
            if let Some(fr) = f.next_frame().unwrap() {
                return fr;
            }
            let mut b = [0u8; 4096];
            let n = io.read(&mut b).await.unwrap();
            assert!(n > 0, "stream ended");
            f.feed(&b[..n]);
        }
    }

    async fn stanza(io: &mut DuplexStream, f: &mut Framer) -> Element {
        loop {
            match next(io, f).await {
                Frame::Stanza(el) => return el,
                Frame::Header(_) => {}
                Frame::Close => panic!("stream closed"),
            }
        }
    }

    /// A connection over an in-process pipe negotiates, authenticates and
    /// binds like one over TCP; a `secure` stream offers no STARTTLS.
    #[tokio::test]
    async fn serve_stream_over_duplex() {
        let dir = std::env::temp_dir().join(format!("chatd-serve-stream-{}", std::process::id()));
        let cfg = crate::config::Config { data_dir: dir.clone(), ..Default::default() };
        let stores = Stores::memory();
        stores.users.put_user("15550000001", &crate::accounts::make_record("pw", 4096, 0)).unwrap();
        let srv = Server::new(cfg, stores).unwrap();
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let peer: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let task = tokio::spawn(super::super::conn::serve_stream(
            super::super::C2s::new(srv.clone()).unwrap(),
            server,
            peer,
            true,
        ));
        let mut f = Framer::new(1 << 20);
        let header = format!(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='{}' version='1.0'>",
            srv.domain()
        );
        client.write_all(header.as_bytes()).await.unwrap();
        let features = stanza(&mut client, &mut f).await;
        assert!(features.child("starttls", crate::protocol::ns::TLS).is_none());
        let mechs = features.child("mechanisms", crate::protocol::ns::SASL).unwrap();
        assert!(mechs.elements().any(|m| m.text() == "PLAIN"));
        assert!(!mechs.elements().any(|m| m.text().ends_with("-PLUS")));
        let cred = base64::engine::general_purpose::STANDARD.encode("\x0015550000001\0pw");
        let auth = format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{cred}</auth>");
        client.write_all(auth.as_bytes()).await.unwrap();
        assert_eq!(stanza(&mut client, &mut f).await.local_name(), "success");
        f.reset();
        client.write_all(header.as_bytes()).await.unwrap();
        let features = stanza(&mut client, &mut f).await;
        assert!(features.child("bind", crate::protocol::ns::BIND).is_some());
        client
            .write_all(b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>r</resource></bind></iq>")
            .await
            .unwrap();
        let bound = stanza(&mut client, &mut f).await;
        assert_eq!(bound.attr("type"), Some("result"));
        client.write_all(b"</stream:stream>").await.unwrap();
        assert!(matches!(next(&mut client, &mut f).await, Frame::Close));
        task.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
