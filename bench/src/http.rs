//! Driving a running server over HTTP/1.1 keep-alive connections, one hyper connection per
//! worker, with every token and header value prepared before the clock starts.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    client::conn::http1,
    header::{self, HeaderValue},
    Method, Request,
};
use hyper_util::rt::TokioIo;
use keypackage_server::wire::{KeyPackageEntry, UploadKeyPackagesRequest};
use prost::Message;
use tokio::net::TcpStream;

use crate::{
    driver::{Control, WorkerStats},
    workload::{self, Spread},
};

/// What the workers send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Scenario {
    /// Consume one package of a target, targets scattered over all seeded users.
    Consume,
    /// Upload one new package for a user who already holds 10 (so the cap trims one).
    Upload,
    /// One upload per consume, to the user just consumed: inventories stay stable.
    Mixed,
    /// The caller's own status.
    Status,
    /// `GET /healthz`: the load generator's and the HTTP stack's own ceiling.
    Healthz,
}

impl Scenario {
    /// The name used in reports.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Consume => "consume",
            Self::Upload => "upload",
            Self::Mixed => "mixed",
            Self::Status => "status",
            Self::Healthz => "healthz",
        }
    }
}

/// Everything a worker needs to build its requests.
pub(crate) struct Workload {
    /// Scenario.
    pub(crate) scenario: Scenario,
    /// Users `0..users` are seeded; consumption targets are scattered over all of them.
    pub(crate) targets: Spread,
    /// Writers (uploaders, status callers, mixed targets) are users `0..tokens.len()`.
    pub(crate) writers: Spread,
    /// `Authorization` values of the writers; callers of consumptions use them too.
    pub(crate) tokens: Vec<HeaderValue>,
    /// Fingerprints of the writers.
    pub(crate) fingerprints: Vec<String>,
    /// Size of uploaded packages.
    pub(crate) package_size: usize,
    /// Makes uploaded packages of this run unique across runs.
    pub(crate) nonce: u64,
    /// `Host` header value.
    pub(crate) host: HeaderValue,
}

impl Workload {
    fn request(&self, k: u64) -> (&'static str, Request<Full<Bytes>>) {
        match self.scenario {
            Scenario::Consume => {
                let caller = &self.tokens[(k % self.tokens.len() as u64) as usize];
                ("consume", self.consume(caller, self.targets.at(k)))
            }
            Scenario::Upload => ("upload", self.upload(self.writers.at(k), k)),
            Scenario::Status => {
                let user = self.writers.at(k) as usize;
                let req = self
                    .base(Method::GET, "/api/v1/key-packages".into())
                    .header(header::AUTHORIZATION, self.tokens[user].clone())
                    .body(Full::default())
                    .expect("valid request");
                ("status", req)
            }
            Scenario::Mixed => {
                let user = self.writers.at(k / 2);
                if k % 2 == 0 {
                    let caller = &self.tokens[((k / 2 + 1) % self.tokens.len() as u64) as usize];
                    ("consume", self.consume(caller, user))
                } else {
                    ("upload", self.upload(user, k))
                }
            }
            Scenario::Healthz => {
                let req = self
                    .base(Method::GET, "/healthz".into())
                    .body(Full::default())
                    .expect("valid");
                ("healthz", req)
            }
        }
    }

    fn base(&self, method: Method, path: String) -> hyper::http::request::Builder {
        Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, self.host.clone())
    }

    fn consume(&self, caller: &HeaderValue, target: u64) -> Request<Full<Bytes>> {
        self.base(Method::GET, format!("/api/v1/key-packages/u{target}"))
            .header(header::AUTHORIZATION, caller.clone())
            .header(
                header::ACCEPT,
                HeaderValue::from_static("application/x-protobuf"),
            )
            .body(Full::default())
            .expect("valid request")
    }

    fn upload(&self, user: u64, k: u64) -> Request<Full<Bytes>> {
        let body = UploadKeyPackagesRequest {
            entries: vec![KeyPackageEntry {
                key_package_data: workload::package("up", self.nonce, k, self.package_size),
                is_last_resort: false,
            }],
            signing_key_fingerprint: self.fingerprints[user as usize].clone(),
        }
        .encode_to_vec();
        self.base(Method::POST, "/api/v1/key-packages".into())
            .header(header::AUTHORIZATION, self.tokens[user as usize].clone())
            .header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-protobuf"),
            )
            .body(Full::new(Bytes::from(body)))
            .expect("valid request")
    }
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Result<Sender> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connect {addr}"))?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Parses `http://host:port` into a socket address; only loopback addresses are accepted.
pub(crate) fn loopback_addr(url: &str) -> Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .context("the server URL must start with http://")?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let hostport = hostport.replace("localhost", "127.0.0.1");
    let addr: SocketAddr = hostport
        .parse()
        .with_context(|| format!("not host:port: {hostport}"))?;
    if !addr.ip().is_loopback() {
        bail!("refusing to load {addr}: only loopback addresses are benchmark targets");
    }
    Ok(addr)
}

/// One closed-loop worker on its own keep-alive connection.
pub(crate) async fn worker(
    addr: SocketAddr,
    workload: Arc<Workload>,
    control: Arc<Control>,
    timeout: Duration,
) -> WorkerStats {
    let mut stats = WorkerStats::new();
    let mut sender: Option<Sender> = None;
    while let Some(k) = control.next() {
        let (op, req) = workload.request(k);
        let started = control.due(k).await;
        let outcome = match tokio::time::timeout(timeout, send(&mut sender, addr, req)).await {
            Ok(Ok(status)) => status,
            Ok(Err(_)) => {
                sender = None;
                "io"
            }
            Err(_) => {
                sender = None;
                "timeout"
            }
        };
        if control.recording() {
            stats
                .entry(op)
                .or_default()
                .record(started.elapsed(), outcome);
        }
        if outcome == "io" {
            // Do not spin on a server that is away.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stats
}

async fn send(
    sender: &mut Option<Sender>,
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> Result<&'static str> {
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        *sender = Some(connect(addr).await?);
    }
    let s = sender.as_mut().expect("just connected");
    s.ready().await?;
    let response = s.send_request(req).await?;
    let status = response.status();
    response.into_body().collect().await?;
    Ok(status_name(status.as_u16()))
}

fn status_name(code: u16) -> &'static str {
    match code {
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        404 => "404",
        408 => "408",
        413 => "413",
        415 => "415",
        429 => "429",
        500 => "500",
        503 => "503",
        _ => "other",
    }
}
