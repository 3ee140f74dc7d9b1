//! A TCP proxy a test puts between the gateway and a real server (`redis-server`,
//! PostgreSQL), and cuts: the network faults that are not a process dying.
//!
//! - [`Cut::Blackhole`]: every byte, both ways, vanishes; nothing errors, nothing closes.
//!   The connections open during the cut stay dead after [`Proxy::restore`] (a middlebox
//!   that lost their state and drops their packets): only a client that gives up on them
//!   and connects again is served. New connections are accepted and never forwarded.
//! - [`Cut::Hold`]: nothing moves, but nothing is lost either (a partition that heals: TCP
//!   retransmits what was sent meanwhile). On [`Proxy::restore`] every held byte arrives, late,
//!   and connections made during the cut reach the server.
//!
//! Either way the server sees nothing of the cut, and the client learns of it only from its
//! own timeouts: the nasty case, unlike a refused connection or a reset.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What the proxy does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Bytes are dropped, both ways; the connections it caught never carry a byte again.
    Blackhole,
    /// Bytes wait (in the proxy and the sockets' buffers) until the restore.
    Hold,
}

/// The proxy's state: forwarding, or one of the cuts, and how many blackholes have begun
/// (a connection open when one began is dead, whatever happened since).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct State {
    cut: Option<Cut>,
    blackholes: u64,
}

impl State {
    fn held(&self) -> bool {
        self.cut == Some(Cut::Hold)
    }
}

/// A proxy on a free loopback port to `upstream`; dropping it closes every connection.
/// Start it inside a Tokio runtime.
pub struct Proxy {
    port: u16,
    state: watch::Sender<State>,
    accepted: Arc<AtomicU64>,
    /// The accept loop, which owns every connection's task (aborted with it).
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (state, watching) = watch::channel(State {
            cut: None,
            blackholes: 0,
        });
        let accepted = Arc::new(AtomicU64::new(0));
        let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, upstream));
        let task = tokio::spawn(accept(listener, upstream, watching, accepted.clone()));
        Proxy {
            port,
            state,
            accepted,
            task,
        }
    }

    /// The port the gateway connects to instead of the server's.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cut the network: see [`Cut`].
    pub fn cut(&self, how: Cut) {
        self.state.send_modify(|s| {
            s.cut = Some(how);
            if how == Cut::Blackhole {
                s.blackholes += 1;
            }
        });
    }

    /// Forward again: held bytes flow, blackholed connections stay dead, new ones work.
    pub fn restore(&self) {
        self.state.send_modify(|s| s.cut = None);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, state: watch::Receiver<State>, accepted: Arc<AtomicU64>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((client, _)) = conn else { continue };
                accepted.fetch_add(1, Ordering::Relaxed);
                // The network's state when the connection came, not when its task first
                // runs: on a loaded machine that can be after a restore, and a connection
                // made during a blackhole would then carry what was sent on it.
                let born = *state.borrow();
                connections.spawn(relay(client, upstream, born, state.clone()));
            }
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One connection, accepted in state `at`: reach the server once the network lets us
/// (never, if it was blackholed), then pump both ways until either side closes.
async fn relay(client: TcpStream, upstream: SocketAddr, at: State, mut state: watch::Receiver<State>) {
    let _ = client.set_nodelay(true);
    let born = at.blackholes;
    let (client_read, client_write) = client.into_split();
    // Connect only while forwarding: wait while held; dead if a blackhole comes first.
    loop {
        let now = *state.borrow_and_update();
        // Dead: accepted during a blackhole, or one began since (each one counts).
        if at.cut == Some(Cut::Blackhole) || now.blackholes > born {
            // Swallow whatever the client sends, answer nothing, close nothing (until the
            // client does).
            let _keep = client_write;
            let mut client_read = client_read;
            let mut buf = vec![0u8; 16 * 1024];
            while matches!(client_read.read(&mut buf).await, Ok(n) if n > 0) {}
            return;
        }
        if !now.held() {
            break;
        }
        if state.changed().await.is_err() {
            return;
        }
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return; // dropping the client closes it: a refused connection
    };
    let _ = server.set_nodelay(true);
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        _ = pump(client_read, server_write, state.clone(), born, false) => {}
        _ = pump(server_read, client_write, state, born, true) => {}
    }
}

/// Copy `from` to `to` while forwarding; wait while held; drop everything, for good, once
/// a blackhole began after the connection was made (`born`: the blackholes before it).
/// `to_client`: the server's side, whose close a dead connection keeps from the client.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut state: watch::Receiver<State>,
    born: u64,
    to_client: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let now = *state.borrow_and_update();
        let dead = now.blackholes > born;
        // Nothing is read while held: the bytes wait in the socket buffers.
        if now.held() && !dead {
            if state.changed().await.is_err() {
                return;
            }
            continue;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(n) if n > 0 => n,
                // Closed or broken. A dead connection keeps its client waiting forever.
                _ => {
                    if to_client && state.borrow().blackholes > born {
                        std::future::pending::<()>().await;
                    }
                    return;
                }
            },
            changed = state.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        // Read just as a hold began: delivered after it, as TCP would.
        loop {
            let now = *state.borrow_and_update();
            if !now.held() || now.blackholes > born {
                break;
            }
            if state.changed().await.is_err() {
                return;
            }
        }
        if state.borrow().blackholes > born {
            continue; // dropped
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
