//! Connections of a migration: TCP with the options a migration link needs
//! (TCP_USER_TIMEOUT, keepalive, NODELAY, DSCP for the demand connection),
//! TLS 1.3 with mutual authentication unless plain TCP is asked for
//! explicitly, a handshake timeout, frames both ways ([`Conn`]).

mod conn;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use conn::{Conn, ConnError};

use crate::tls;

/// How long a TCP connect and a TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a connection could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// TCP connect failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Binding the listening socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Accepting failed.
    #[error("accepting a connection failed: {0}")]
    Accept(#[source] std::io::Error),
    /// The TLS handshake failed: the peer could not authenticate (or we
    /// could not, to it).
    #[error(
        "TLS handshake with {peer} failed (is the peer using credentials from the same CA, and TLS at all?): {source}"
    )]
    Handshake {
        /// The peer.
        peer: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Socket options could not be set.
    #[error("setting socket options for {peer}: {source}")]
    Options {
        /// The peer.
        peer: SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
}

/// Security of the link.
#[derive(Clone)]
pub enum Security {
    /// Plain TCP (`--insecure`).
    Insecure,
    /// Mutual TLS from a credentials directory.
    Tls {
        /// Client side (the source): its config and the name to check.
        client: Option<(
            Arc<rustls::ClientConfig>,
            rustls::pki_types::ServerName<'static>,
        )>,
        /// Server side (the destination).
        server: Option<Arc<rustls::ServerConfig>>,
    },
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Security::Insecure => f.write_str("Insecure"),
            Security::Tls { .. } => f.write_str("Tls"),
        }
    }
}

impl Security {
    /// The connecting side's TLS from `dir`.
    pub fn tls_client(dir: &Path, server_name: &str) -> Result<Security, tls::TlsError> {
        Ok(Security::Tls {
            client: Some(tls::client_config(dir, server_name)?),
            server: None,
        })
    }

    /// The listening side's TLS from `dir`.
    pub fn tls_server(dir: &Path) -> Result<Security, tls::TlsError> {
        Ok(Security::Tls {
            client: None,
            server: Some(tls::server_config(dir)?),
        })
    }

    /// Whether the link is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Security::Tls { .. })
    }
}

fn handshake(
    mut sock: TcpStream,
    peer: SocketAddr,
    mut conn: rustls::Connection,
) -> Result<Conn, NetError> {
    let err = |source| NetError::Handshake { peer, source };
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).map_err(err)?;
    }
    // The last flight (the client's Finished) may still be queued.
    while conn.wants_write() {
        conn.write_tls(&mut sock).map_err(err)?;
    }
    Ok(Conn::tls(sock, conn, peer))
}

/// Connects to `addr` (the destination) as the source.
pub(crate) fn dial(
    addr: SocketAddr,
    security: &Security,
    user_timeout: Duration,
    demand: bool,
) -> Result<Conn, NetError> {
    let sock = TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT)
        .map_err(|source| NetError::Connect { addr, source })?;
    let opts = |source| NetError::Options { peer: addr, source };
    conn::tune(&sock, user_timeout, demand).map_err(opts)?;
    sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(opts)?;
    sock.set_write_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(opts)?;
    let conn = match security {
        Security::Insecure => Conn::plain(sock, addr),
        Security::Tls { client, .. } => {
            let Some((cfg, name)) = client else {
                return Err(NetError::Handshake {
                    peer: addr,
                    source: std::io::Error::other("no client TLS configuration"),
                });
            };
            let c = rustls::ClientConnection::new(cfg.clone(), name.clone()).map_err(|e| {
                NetError::Handshake {
                    peer: addr,
                    source: std::io::Error::other(e),
                }
            })?;
            handshake(sock, addr, c.into())?
        }
    };
    Ok(conn)
}

/// The destination's listening socket.
#[derive(Debug)]
pub struct Listener {
    sock: TcpListener,
    security: Security,
    user_timeout: Duration,
}

impl Listener {
    /// Listens on `addr`.
    pub fn bind(
        addr: SocketAddr,
        security: Security,
        user_timeout: Duration,
    ) -> Result<Listener, NetError> {
        let sock = TcpListener::bind(addr).map_err(|source| NetError::Bind { addr, source })?;
        Ok(Listener {
            sock,
            security,
            user_timeout,
        })
    }

    /// The address it listens on (the port, when 0 was asked for).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.sock.local_addr().ok()
    }

    /// Waits at most `timeout` for a connection (None: for ever); Ok(None)
    /// on timeout.
    pub(crate) fn accept(&self, timeout: Option<Duration>) -> Result<Option<Conn>, NetError> {
        let (sock, peer) = match timeout {
            None => {
                self.sock.set_nonblocking(false).map_err(NetError::Accept)?;
                self.sock.accept().map_err(NetError::Accept)?
            }
            Some(t) => {
                self.sock.set_nonblocking(true).map_err(NetError::Accept)?;
                let until = std::time::Instant::now() + t;
                loop {
                    match self.sock.accept() {
                        Ok(x) => break x,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if std::time::Instant::now() >= until {
                                return Ok(None);
                            }
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => return Err(NetError::Accept(e)),
                    }
                }
            }
        };
        let opts = |source| NetError::Options { peer, source };
        sock.set_nonblocking(false).map_err(opts)?;
        conn::tune(&sock, self.user_timeout, false).map_err(opts)?;
        sock.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(opts)?;
        sock.set_write_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(opts)?;
        let conn = match &self.security {
            Security::Insecure => Conn::plain(sock, peer),
            Security::Tls { server, .. } => {
                let Some(cfg) = server else {
                    return Err(NetError::Handshake {
                        peer,
                        source: std::io::Error::other("no server TLS configuration"),
                    });
                };
                let c = rustls::ServerConnection::new(cfg.clone()).map_err(|e| {
                    NetError::Handshake {
                        peer,
                        source: std::io::Error::other(e),
                    }
                })?;
                handshake(sock, peer, c.into())?
            }
        };
        Ok(Some(conn))
    }
}
