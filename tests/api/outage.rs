//! The database goes away and comes back: a TCP proxy between the server process and Postgres
//! that the test cuts (closing every connection, refusing new ones) and restores.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
    task::{AbortHandle, JoinHandle},
    time::Instant,
};

use crate::harness::*;

/// How long an answer may take while the database is away ("a few seconds", generously).
const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// Forwards TCP connections to `upstream`; the test can cut or stall it, then restore it.
pub(crate) struct Proxy {
    pub(crate) addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    stalled: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

/// What the proxy does with connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Mode {
    /// Forward bytes both ways.
    #[default]
    Forward,
    /// Close at once: the database is down.
    Refuse,
    /// Keep connections open but forward nothing: a network partition, a frozen host.
    Stall,
}

#[derive(Default)]
struct ProxyState {
    mode: Mode,
    /// Forwarding tasks; aborting one closes both of its sockets.
    connections: Vec<AbortHandle>,
    /// Connections accepted while stalled, held open unanswered.
    held: Vec<TcpStream>,
}

impl Proxy {
    pub(crate) async fn start(upstream: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let (stalled, _) = watch::channel(false);
        let (shared, stall) = (state.clone(), stalled.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let mut state = shared.lock().unwrap();
                match state.mode {
                    Mode::Refuse => drop(client),
                    Mode::Stall => state.held.push(client),
                    Mode::Forward => {
                        let task =
                            tokio::spawn(forward(client, upstream.clone(), stall.subscribe()));
                        state.connections.retain(|c| !c.is_finished());
                        state.connections.push(task.abort_handle());
                    }
                }
            }
        });
        Self {
            addr,
            state,
            stalled,
            accept,
        }
    }

    /// Closes every forwarded connection and refuses new ones until [`Proxy::restore`].
    pub(crate) fn cut(&self) {
        self.set(Mode::Refuse);
    }

    /// Stops forwarding on every connection, old and new, without closing any.
    pub(crate) fn stall(&self) {
        self.set(Mode::Stall);
    }

    /// Forwards again; connections stalled meanwhile are closed (their streams are torn).
    pub(crate) fn restore(&self) {
        self.set(Mode::Forward);
    }

    fn set(&self, mode: Mode) {
        let mut state = self.state.lock().unwrap();
        state.mode = mode;
        self.stalled.send_replace(mode == Mode::Stall);
        if mode != Mode::Stall {
            state.held.clear();
            for connection in state.connections.drain(..) {
                connection.abort();
            }
        }
    }
}

/// Copies bytes between `client` and `upstream` until either closes or the proxy stalls, then
/// holds both sockets open, silent, until the task is aborted.
async fn forward(mut client: TcpStream, upstream: String, mut stalled: watch::Receiver<bool>) {
    let Ok(mut server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let stall = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
        changed = stalled.wait_for(|s| *s) => changed.is_ok(),
    };
    if stall {
        std::future::pending::<()>().await;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Splits `scheme://[userinfo@]host:port/rest` into (`scheme://userinfo@`, `host:port`, `/rest`).
pub(crate) fn split_url(url: &str) -> (String, String, String) {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    let (userinfo, host) = authority
        .rsplit_once('@')
        .map_or(("", authority), |(u, h)| (u, h));
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    };
    let prefix = if userinfo.is_empty() {
        format!("{scheme}://")
    } else {
        format!("{scheme}://{userinfo}@")
    };
    (prefix, host, path.to_owned())
}

/// GETs `path` and returns the status; the answer must come within [`ANSWER_WITHIN`].
async fn get_status(server: &ServerProcess, path: &str) -> u16 {
    server
        .client
        .get(server.url(path))
        .bearer_auth(token("alice"))
        .timeout(ANSWER_WITHIN)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path} got no answer within {ANSWER_WITHIN:?}: {e}"))
        .status()
        .as_u16()
}

#[tokio::test]
async fn requests_get_503_while_the_database_is_down_and_recover_after() {
    outage(Mode::Refuse).await;
}

#[tokio::test]
async fn requests_get_503_while_the_database_is_unreachable_and_recover_after() {
    outage(Mode::Stall).await;
}

/// Runs a server through the proxy, takes the database away as `mode` says, checks every kind
/// of request is answered with 503 in bounded time, then restores it and checks recovery.
async fn outage(mode: Mode) {
    let Some(db) = postgres_only!(format!("outage ({mode:?})")) else {
        return;
    };
    let (prefix, upstream, path) = split_url(&db.url);
    let proxy = Proxy::start(upstream).await;
    let dir = TempDir::new();
    let mut vars = crate::harness::server_env(&db, &dir);
    vars.insert(
        "DATABASE_URL".into(),
        Some(format!("{prefix}{}{path}", proxy.addr)),
    );
    let server = ServerProcess::start(&vars).await;
    server.upload("bob", &[(kp("before"), false)], "").await;
    assert_eq!(get_status(&server, "/readyz").await, 200);

    match mode {
        Mode::Refuse => proxy.cut(),
        Mode::Stall => proxy.stall(),
        Mode::Forward => unreachable!("not an outage"),
    }
    assert_eq!(
        get_status(&server, "/readyz").await,
        503,
        "not ready without a database"
    );
    assert_eq!(
        get_status(&server, "/healthz").await,
        200,
        "alive without a database"
    );
    let requests = [
        server
            .client
            .post(server.url("/api/v1/key-packages"))
            .header("content-type", "application/x-protobuf")
            .body(prost::Message::encode_to_vec(&upload_request(
                &[(kp("during"), false)],
                "",
            ))),
        server.client.get(server.url("/api/v1/key-packages/bob")),
        server.client.get(server.url("/api/v1/key-packages")),
        server.client.delete(server.url("/api/v1/key-packages")),
        server
            .client
            .get(server.url("/api/v1/users/bob/fingerprint")),
    ];
    for request in requests {
        let request = request
            .bearer_auth(token("alice"))
            .timeout(ANSWER_WITHIN)
            .build()
            .expect("request");
        let what = format!("{} {}", request.method(), request.url().path());
        let response = server
            .client
            .execute(request)
            .await
            .unwrap_or_else(|e| panic!("{what}: no answer within {ANSWER_WITHIN:?}: {e}"));
        problem(response, 503, "service_unavailable").await;
    }

    proxy.restore();
    let deadline = Instant::now() + PROCESS_PATIENCE;
    while get_status(&server, "/readyz").await != 200 {
        assert!(
            Instant::now() < deadline,
            "never ready again; log:\n{}",
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.upload("alice", &[(kp("after"), false)], "").await;
    let response = server.consume_raw("alice", "bob").await;
    assert_eq!(
        response.status(),
        200,
        "the package from before the outage is still there"
    );
    assert_eq!(server.status("alice").await.regular_count, 1);
}

#[test]
fn database_urls_split_around_the_host() {
    assert_eq!(
        split_url("postgres://postgres@127.0.0.1:5432/kps_x"),
        (
            "postgres://postgres@".into(),
            "127.0.0.1:5432".into(),
            "/kps_x".into()
        )
    );
    assert_eq!(
        split_url("postgresql://localhost/db?sslmode=disable"),
        (
            "postgresql://".into(),
            "localhost:5432".into(),
            "/db?sslmode=disable".into()
        )
    );
}
