//! A lean Redis connection for the decision path: commands written straight into one buffer,
//! replies read with a parser that knows the few shapes the script and the handshake return.
//!
//! The Redis store's dispatchers each own one of these, so a batch of decisions costs one
//! write and one read, with no task or channel between the dispatcher and the socket. The
//! connection speaks RESP2 over TCP, TLS (rustls) or a unix socket, and authenticates and
//! selects its database as the URL says. It does not reconnect by itself: after a failure the
//! dispatcher drops it and opens another for its next batch.

use std::io;
use std::sync::Arc;

use futures_util::FutureExt;
use redis::{ConnectionAddr, ConnectionInfo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

use super::StoreError;

/// A byte stream to Redis: TCP, TLS over TCP, or a unix socket.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One command, encoded as RESP: an array of bulk strings.
pub struct Command {
    bytes: Vec<u8>,
}

impl Command {
    /// A command of `args` arguments (the command's name counts as one).
    pub fn with_args(args: usize) -> Command {
        let mut bytes = Vec::with_capacity(64 + 16 * args);
        bytes.push(b'*');
        push_decimal(&mut bytes, args as u64);
        bytes.extend_from_slice(b"\r\n");
        Command { bytes }
    }

    /// Appends a bulk-string argument.
    pub fn arg(&mut self, value: &[u8]) -> &mut Command {
        self.bytes.push(b'$');
        push_decimal(&mut self.bytes, value.len() as u64);
        self.bytes.extend_from_slice(b"\r\n");
        self.bytes.extend_from_slice(value);
        self.bytes.extend_from_slice(b"\r\n");
        self
    }

    /// Appends a number, in decimal, as Redis expects numbers.
    pub fn number(&mut self, value: u64) -> &mut Command {
        let mut digits = Vec::with_capacity(20);
        push_decimal(&mut digits, value);
        self.arg(&digits)
    }
}

fn push_decimal(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// What Redis answered, in the shapes this store meets.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// `+OK` and other simple strings.
    Status(String),
    /// An error reply, e.g. `NOSCRIPT No matching script.`
    Error(String),
    /// An integer.
    Integer(i64),
    /// A bulk string; `None` for nil.
    Bulk(Option<Vec<u8>>),
    /// An array of integers (what the script returns); `None` for a nil array.
    Integers(Option<Vec<i64>>),
}

/// Longest reply line (a simple string or an error) accepted before the reply is taken to be
/// garbage.
const MAX_LINE: usize = 64 * 1024;

/// Largest bulk string or array accepted.
const MAX_ITEMS: usize = 64 * 1024 * 1024;

/// An open, authenticated connection.
pub struct Connection {
    stream: Box<dyn Stream>,
    /// Bytes read: `buffer[start..end]` are not parsed yet; the rest is room to read into.
    buffer: Vec<u8>,
    start: usize,
    end: usize,
}

impl Connection {
    /// Connects to `info`'s server, over TLS with `tls` when the address asks for it, then
    /// authenticates and selects the database.
    pub async fn open(
        info: &ConnectionInfo,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<Connection, StoreError> {
        let stream: Box<dyn Stream> = match info.addr() {
            ConnectionAddr::Tcp(host, port) => {
                let stream = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(io_error)?;
                stream.set_nodelay(true).map_err(io_error)?;
                Box::new(stream)
            }
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure,
                ..
            } => {
                if *insecure {
                    return Err(StoreError::Failed(
                        "rediss:// without certificate checks (#insecure) is not supported"
                            .to_owned(),
                    ));
                }
                let Some(tls) = tls else {
                    return Err(StoreError::Failed("TLS is not set up".to_owned()));
                };
                let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
                    StoreError::Failed(format!("{host} is not a name TLS can check: {e}"))
                })?;
                let stream = TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(io_error)?;
                stream.set_nodelay(true).map_err(io_error)?;
                let connector = tokio_rustls::TlsConnector::from(tls.clone());
                Box::new(connector.connect(name, stream).await.map_err(io_error)?)
            }
            ConnectionAddr::Unix(path) => {
                Box::new(UnixStream::connect(path).await.map_err(io_error)?)
            }
            other => {
                return Err(StoreError::Failed(format!(
                    "unsupported Redis address {other:?}"
                )));
            }
        };
        let mut connection = Connection {
            stream,
            buffer: vec![0; 16 * 1024],
            start: 0,
            end: 0,
        };
        let settings = info.redis_settings();
        if let Some(password) = settings.password() {
            let mut auth = Command::with_args(if settings.username().is_some() { 3 } else { 2 });
            auth.arg(b"AUTH");
            if let Some(username) = settings.username() {
                auth.arg(username.as_bytes());
            }
            auth.arg(password.as_bytes());
            connection.expect_ok(&auth, "AUTH").await?;
        }
        if settings.db() != 0 {
            let mut select = Command::with_args(2);
            select
                .arg(b"SELECT")
                .arg(settings.db().to_string().as_bytes());
            connection.expect_ok(&select, "SELECT").await?;
        }
        Ok(connection)
    }

    async fn expect_ok(&mut self, command: &Command, name: &str) -> Result<(), StoreError> {
        match self.call(command).await? {
            Reply::Status(_) => Ok(()),
            Reply::Error(error) => Err(StoreError::Failed(format!("{name}: {error}"))),
            other => Err(protocol(format!("{name} answered {other:?}"))),
        }
    }

    /// Whether the connection can no longer be used, seen without waiting: the server closed
    /// it (Redis's idle `timeout`, `CLIENT KILL`, a proxy's idle limit), it broke, or bytes
    /// came that nobody asked for. Checked before a connection is used again, so that a
    /// decision does not fail on a connection that died while idle.
    pub fn is_stale(&mut self) -> bool {
        if self.start != self.end {
            return true;
        }
        // Readiness is tracked by the runtime: while nothing has arrived this returns
        // without a system call.
        // Anything but "nothing yet" (an end, an error, unasked bytes) makes it stale.
        self.stream
            .read(&mut self.buffer[..])
            .now_or_never()
            .is_some()
    }

    /// Sends `command` and reads its reply. After an error the connection is in an unknown
    /// state and must be dropped.
    pub async fn call(&mut self, command: &Command) -> Result<Reply, StoreError> {
        self.stream
            .write_all(&command.bytes)
            .await
            .map_err(io_error)?;
        self.stream.flush().await.map_err(io_error)?;
        loop {
            if let Some((reply, used)) = parse(&self.buffer[self.start..self.end])? {
                self.start += used;
                if self.start == self.end {
                    (self.start, self.end) = (0, 0);
                }
                return Ok(reply);
            }
            if self.end == self.buffer.len() {
                // Full: move what is unparsed to the front, or make room.
                if self.start > 0 {
                    self.buffer.copy_within(self.start..self.end, 0);
                    (self.start, self.end) = (0, self.end - self.start);
                } else {
                    self.buffer.resize(self.buffer.len() * 2, 0);
                }
            }
            let read = self.stream.read(&mut self.buffer[self.end..]).await;
            match read.map_err(io_error)? {
                0 => {
                    return Err(StoreError::Unavailable(
                        "Redis closed the connection".to_owned(),
                    ));
                }
                read => self.end += read,
            }
        }
    }
}

fn io_error(error: io::Error) -> StoreError {
    StoreError::Unavailable(format!("Redis connection: {error}"))
}

fn protocol(what: String) -> StoreError {
    StoreError::Failed(format!("unexpected reply from Redis: {what}"))
}

/// The line at the start of `input` without its CRLF, and the bytes it takes; `None` when the
/// line is not all there yet.
fn line(input: &[u8]) -> Result<Option<(&[u8], usize)>, StoreError> {
    match input.windows(2).position(|pair| pair == b"\r\n") {
        Some(end) => Ok(Some((&input[..end], end + 2))),
        None if input.len() > MAX_LINE => Err(protocol("a line without an end".to_owned())),
        None => Ok(None),
    }
}

fn integer(text: &[u8]) -> Result<i64, StoreError> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| {
            protocol(format!(
                "{:?} is not a number",
                String::from_utf8_lossy(text)
            ))
        })
}

/// A length that may be -1 (nil), bounded by [`MAX_ITEMS`].
fn length(text: &[u8]) -> Result<Option<usize>, StoreError> {
    match integer(text)? {
        -1 => Ok(None),
        n => usize::try_from(n)
            .ok()
            .filter(|&n| n <= MAX_ITEMS)
            .map(Some)
            .ok_or_else(|| protocol(format!("a length of {n}"))),
    }
}

/// Parses one reply from the start of `input`: the reply and the bytes it takes, or `None`
/// when more bytes are needed.
pub fn parse(input: &[u8]) -> Result<Option<(Reply, usize)>, StoreError> {
    let Some((&kind, _)) = input.split_first() else {
        return Ok(None);
    };
    let Some((text, mut used)) = line(&input[1..])? else {
        return Ok(None);
    };
    used += 1;
    let reply = match kind {
        b'+' => Reply::Status(String::from_utf8_lossy(text).into_owned()),
        b'-' => Reply::Error(String::from_utf8_lossy(text).into_owned()),
        b':' => Reply::Integer(integer(text)?),
        b'$' => match length(text)? {
            None => Reply::Bulk(None),
            Some(len) => {
                if input.len() < used + len + 2 {
                    return Ok(None);
                }
                if &input[used + len..used + len + 2] != b"\r\n" {
                    return Err(protocol("a bulk string without its end".to_owned()));
                }
                let bulk = input[used..used + len].to_vec();
                used += len + 2;
                Reply::Bulk(Some(bulk))
            }
        },
        b'*' => match length(text)? {
            None => Reply::Integers(None),
            Some(count) => {
                let mut items = Vec::with_capacity(count.min(4096));
                for _ in 0..count {
                    let rest = &input[used..];
                    match rest.first() {
                        None => return Ok(None),
                        Some(b':') => {}
                        Some(_) => {
                            return Err(protocol("an array of something else than numbers".into()));
                        }
                    }
                    let Some((text, taken)) = line(&rest[1..])? else {
                        return Ok(None);
                    };
                    items.push(integer(text)?);
                    used += 1 + taken;
                }
                Reply::Integers(Some(items))
            }
        },
        other => return Err(protocol(format!("a reply of kind {:?}", other as char))),
    };
    Ok(Some((reply, used)))
}

/// TLS settings for `rediss://`: the given authority's certificates, or the system's.
pub fn tls_config(ca_pem: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            let mut reader = io::BufReader::new(pem);
            let certificates: Vec<_> = rustls_pemfile_certs(&mut reader)?;
            if certificates.is_empty() {
                return Err(StoreError::Failed(
                    "the Redis CA file holds no certificate".to_owned(),
                ));
            }
            for certificate in certificates {
                roots.add(certificate).map_err(|e| {
                    StoreError::Failed(format!("a certificate of the Redis CA file: {e}"))
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for certificate in found.certs {
                // A system certificate rustls cannot use is skipped, as other TLS clients do.
                let _ = roots.add(certificate);
            }
        }
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The certificates of a PEM file.
fn rustls_pemfile_certs(
    reader: &mut dyn io::BufRead,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, StoreError> {
    use rustls::pki_types::pem::PemObject;
    let mut pem = Vec::new();
    reader
        .read_to_end(&mut pem)
        .map_err(|e| StoreError::Failed(format!("the Redis CA file: {e}")))?;
    rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Failed(format!("the Redis CA file: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut command = Command::with_args(3);
        command.arg(b"SET").arg(b"k").number(1234567890);
        assert_eq!(
            command.bytes,
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$10\r\n1234567890\r\n".to_vec()
        );
        let mut zero = Command::with_args(1);
        zero.number(0);
        assert_eq!(zero.bytes, b"*1\r\n$1\r\n0\r\n".to_vec());
    }

    #[test]
    fn replies_parse_whole_or_wait_for_more() {
        let whole = b"*3\r\n:1\r\n:-1\r\n:42\r\n+OK\r\n";
        let (reply, used) = parse(whole).unwrap().unwrap();
        assert_eq!(reply, Reply::Integers(Some(vec![1, -1, 42])));
        assert_eq!(&whole[used..], b"+OK\r\n");
        for cut in 0..used {
            assert_eq!(parse(&whole[..cut]).unwrap(), None, "cut at {cut}");
        }
        let cases: [(&[u8], Reply); 6] = [
            (b"+OK\r\n", Reply::Status("OK".into())),
            (
                b"-NOSCRIPT No matching script\r\n",
                Reply::Error("NOSCRIPT No matching script".into()),
            ),
            (b":7\r\n", Reply::Integer(7)),
            (b"$3\r\nabc\r\n", Reply::Bulk(Some(b"abc".to_vec()))),
            (b"$-1\r\n", Reply::Bulk(None)),
            (b"*0\r\n", Reply::Integers(Some(Vec::new()))),
        ];
        for (input, expected) in cases {
            assert_eq!(parse(input).unwrap(), Some((expected, input.len())));
        }
    }

    /// Replies larger than the buffer, arriving a few bytes at a time, back to back.
    #[tokio::test]
    async fn replies_are_read_across_many_reads() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut connection = Connection {
            stream: Box::new(client),
            buffer: vec![0; 16],
            start: 0,
            end: 0,
        };
        let numbers: Vec<i64> = (0..5_000).map(|n| n * 7 - 100).collect();
        let mut encoded = format!("*{}\r\n", numbers.len());
        for n in &numbers {
            encoded.push_str(&format!(":{n}\r\n"));
        }
        encoded.push_str("+OK\r\n");
        let serving = tokio::spawn(async move {
            let mut request = [0u8; 64];
            let _ = server.read(&mut request).await;
            for chunk in encoded.as_bytes().chunks(7) {
                server.write_all(chunk).await.expect("the client reads");
            }
            server
        });
        let mut ping = Command::with_args(1);
        ping.arg(b"PING");
        let first = connection.call(&ping).await.expect("a reply");
        assert_eq!(first, Reply::Integers(Some(numbers)));
        let _server = serving.await.expect("the server task");
        // The status sent right behind the array is the next call's reply.
        let second = connection.call(&ping).await.expect("a reply");
        assert_eq!(second, Reply::Status("OK".into()));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for input in [
            &b"?what\r\n"[..],
            b":x\r\n",
            b"*2\r\n$1\r\na\r\n",
            b"$3\r\nabcd\r\n",
            b"*-5\r\n",
            b"$99999999999\r\n",
        ] {
            assert!(
                parse(input).is_err(),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }
}
