//! SIGKILL in the middle of a stream of uploads and consumptions: after a restart on the same
//! database, every upload is there whole or not at all, and no package was handed out twice.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use tokio::{sync::watch, task::JoinSet, time::Instant};

use crate::harness::*;

/// Uploads confirmed before the kill.
const CONFIRMED_BEFORE_KILL: usize = 30;
/// Packages handed out before the kill.
const CONSUMED_BEFORE_KILL: usize = 15;
/// Concurrent uploaders and consumers.
const WORKERS: usize = 4;

/// User `i` uploads once, `entries(i)` packages (at most 10, so the cap never trims).
fn entry_count(user: usize) -> usize {
    2 + user % 9
}

/// Entry `j` of user `i`'s upload: its user, position and count are readable in its bytes.
fn entry(user: usize, j: usize) -> Vec<u8> {
    let mut data = kp(&format!("crash-u{user}-e{j}-of{}-", entry_count(user)));
    // Some weight, so the transaction has work to do when the kill lands.
    data.resize(2048, b'x');
    data
}

/// `(user, j)` of a package made by [`entry`].
fn parse_entry(data: &[u8]) -> (usize, usize) {
    let text = String::from_utf8_lossy(&data[4..]);
    let parts: Vec<&str> = text.split('-').collect();
    let number = |part: &str, prefix: &str| -> usize {
        part.strip_prefix(prefix)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not a package of this test: {text:.40}"))
    };
    assert_eq!(parts[0], "crash", "not a package of this test: {text:.40}");
    let user = number(parts[1], "u");
    let (j, of) = (number(parts[2], "e"), number(parts[3], "of"));
    assert_eq!(of, entry_count(user), "entry count recorded in the package");
    assert!(j < of, "entry index within the upload");
    (user, j)
}

fn user_id(user: usize) -> String {
    format!("crash{user}")
}

/// What the clients saw.
#[derive(Default)]
struct Ledger {
    /// Users whose upload got 201.
    confirmed: HashSet<usize>,
    /// Every package received, with the user it was asked for.
    handed_out: Vec<(usize, Vec<u8>)>,
    /// Consumptions per target whose outcome is unknown (no response): each may have taken one.
    unknown_consumes: HashMap<usize, usize>,
}

struct Stream {
    base: String,
    client: reqwest::Client,
    next_user: AtomicUsize,
    ledger: Mutex<Ledger>,
    progress: watch::Sender<()>,
}

/// Uploads one user's packages after another until the server stops answering.
async fn upload_worker(stream: Arc<Stream>) {
    loop {
        let user = stream.next_user.fetch_add(1, Ordering::SeqCst);
        let entries: Vec<_> = (0..entry_count(user))
            .map(|j| (entry(user, j), false))
            .collect();
        let body = prost::Message::encode_to_vec(&upload_request(&entries, ""));
        let answer = stream
            .client
            .post(format!("{}/api/v1/key-packages", stream.base))
            .bearer_auth(crate::harness::token(&user_id(user)))
            .header("content-type", "application/x-protobuf")
            .body(body)
            .send()
            .await;
        match answer {
            Ok(response) if response.status() == 201 => {
                stream.ledger.lock().unwrap().confirmed.insert(user);
                stream.progress.send_modify(|_| {});
            }
            Ok(response) => assert!(
                response.status().is_server_error(),
                "upload refused: {:?}",
                response.text().await
            ),
            Err(_) => return,
        }
    }
}

/// Consumes from random users already uploading until the server stops answering.
async fn consume_worker(stream: Arc<Stream>, caller: String) {
    loop {
        let launched = stream.next_user.load(Ordering::SeqCst).max(1);
        let target = rand::random::<usize>() % launched;
        let answer = stream
            .client
            .get(format!(
                "{}/api/v1/key-packages/{}",
                stream.base,
                user_id(target)
            ))
            .bearer_auth(crate::harness::token(&caller))
            .send()
            .await;
        let response = match answer {
            Ok(response) => response,
            Err(_) => {
                *stream
                    .ledger
                    .lock()
                    .unwrap()
                    .unknown_consumes
                    .entry(target)
                    .or_default() += 1;
                return;
            }
        };
        match response.status().as_u16() {
            200 => {
                let Ok(body) = response.bytes().await else {
                    *stream
                        .ledger
                        .lock()
                        .unwrap()
                        .unknown_consumes
                        .entry(target)
                        .or_default() += 1;
                    return;
                };
                let message: keypackage_server::wire::KeyPackageResponse =
                    prost::Message::decode(body).expect("decodes");
                assert!(
                    !message.is_last_resort,
                    "no last-resort package was uploaded"
                );
                let data = message.key_package_data.to_vec();
                stream
                    .ledger
                    .lock()
                    .unwrap()
                    .handed_out
                    .push((target, data));
                stream.progress.send_modify(|_| {});
            }
            404 => {}
            status if status >= 500 => {
                *stream
                    .ledger
                    .lock()
                    .unwrap()
                    .unknown_consumes
                    .entry(target)
                    .or_default() += 1;
            }
            status => panic!("consume answered {status}: {:?}", response.text().await),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_leaves_uploads_whole_or_absent_and_hands_nothing_out_twice() {
    let db = TestDb::new().await;
    let dir = TempDir::new();
    let settings = [("KPS_CONSUME_LIMIT_PER_MINUTE", "1000000")];
    let mut server = ServerProcess::start_on(&db, &dir, &settings).await;

    let (progress, mut progressed) = watch::channel(());
    let stream = Arc::new(Stream {
        base: server.base.clone(),
        client: reqwest::Client::new(),
        next_user: AtomicUsize::new(0),
        ledger: Mutex::new(Ledger::default()),
        progress,
    });
    let mut workers = JoinSet::new();
    for w in 0..WORKERS {
        workers.spawn(upload_worker(stream.clone()));
        workers.spawn(consume_worker(stream.clone(), format!("consumer{w}")));
    }

    // The workers never run out of work, so the kill always lands mid-stream.
    let deadline = Instant::now() + PROCESS_PATIENCE;
    loop {
        {
            let ledger = stream.ledger.lock().unwrap();
            if ledger.confirmed.len() >= CONFIRMED_BEFORE_KILL
                && ledger.handed_out.len() >= CONSUMED_BEFORE_KILL
            {
                break;
            }
        }
        tokio::time::timeout_at(deadline, progressed.changed())
            .await
            .expect("the stream makes progress")
            .expect("progress channel open");
    }
    server.kill().await;
    tokio::time::timeout(PROCESS_PATIENCE, async {
        while let Some(done) = workers.join_next().await {
            done.expect("worker");
        }
    })
    .await
    .expect("the workers stop once the server is gone");

    let mut ledger = std::mem::take(&mut *stream.ledger.lock().unwrap());
    let launched = stream.next_user.load(Ordering::SeqCst);
    let before = ledger.handed_out.len();

    // Restart on the same database and take everything that is left.
    let server = ServerProcess::start_on(&db, &dir, &settings).await;
    for user in 0..launched {
        loop {
            let response = server.consume_raw("drainer", &user_id(user)).await;
            match response.status().as_u16() {
                200 => {
                    let message: keypackage_server::wire::KeyPackageResponse =
                        crate::harness::decode(response).await;
                    assert!(!message.is_last_resort);
                    ledger
                        .handed_out
                        .push((user, message.key_package_data.to_vec()));
                }
                404 => break,
                status => panic!("consume after restart answered {status}"),
            }
        }
    }

    let mut seen = HashSet::new();
    let mut per_user: HashMap<usize, usize> = HashMap::new();
    for (target, data) in &ledger.handed_out {
        let (user, _) = parse_entry(data);
        assert_eq!(
            user,
            *target,
            "a package of {} came from {}",
            user_id(user),
            user_id(*target)
        );
        assert!(
            seen.insert(data.clone()),
            "handed out twice: {:.40}",
            String::from_utf8_lossy(&data[4..])
        );
        *per_user.entry(user).or_default() += 1;
    }
    for user in 0..launched {
        let k = entry_count(user);
        let got = per_user.get(&user).copied().unwrap_or(0);
        // A consumption that got no answer may have taken one package the test never saw.
        let unknown = ledger.unknown_consumes.get(&user).copied().unwrap_or(0);
        let whole = got <= k && got + unknown >= k;
        if ledger.confirmed.contains(&user) {
            assert!(
                whole,
                "{}: confirmed upload of {k}, found {got} (+{unknown} unknown)",
                user_id(user)
            );
        } else {
            assert!(
                got == 0 || whole,
                "{}: unconfirmed upload of {k} is partial: {got} found (+{unknown} unknown)",
                user_id(user)
            );
        }
    }
    eprintln!(
        "crash: {launched} uploads started, {} confirmed, {before} packages handed out before \
         the kill, {} after",
        ledger.confirmed.len(),
        ledger.handed_out.len() - before
    );
}

/// A claim with an `Idempotency-Key` whose response the client never read, then SIGKILL: the
/// retry to the restarted server replays the package that claim took (the record was
/// committed with the hand-out, not kept in the dead process), and takes no other.
#[tokio::test]
async fn a_claim_lost_to_a_sigkill_is_replayed_by_the_restarted_server() {
    use tokio::io::AsyncWriteExt;

    let db = TestDb::new().await;
    let dir = TempDir::new();
    let mut server = ServerProcess::start_on(&db, &dir, &[]).await;
    let entries: Vec<_> = (0..3).map(|i| (kp(&format!("lost{i}")), false)).collect();
    server.upload("bob", &entries, "").await;

    // The claim goes out on a connection nobody reads; once the package is gone from bob's
    // inventory, the hand-out is committed, and the server dies.
    let request = raw_request(
        "GET",
        b"/api/v1/key-packages/bob",
        &[bearer_line("alice"), b"Idempotency-Key: lost-1".to_vec()],
        b"",
    );
    let mut unread = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    unread.write_all(&request).await.expect("send the claim");
    let deadline = Instant::now() + PROCESS_PATIENCE;
    while server.status("bob").await.regular_count == 3 {
        assert!(Instant::now() < deadline, "the claim was never handled");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    server.kill().await;
    drop(unread);

    let server = ServerProcess::start_on(&db, &dir, &[]).await;
    let retry = server
        .client
        .get(server.url("/api/v1/key-packages/bob"))
        .bearer_auth(token("alice"))
        .header("idempotency-key", "lost-1")
        .send()
        .await
        .expect("retry");
    assert_eq!(retry.status(), 200);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    let replayed: keypackage_server::wire::KeyPackageResponse = decode(retry).await;
    assert_eq!(
        replayed.key_package_data.to_vec(),
        entries[0].0,
        "the oldest package, the one the lost claim took"
    );
    assert_eq!(
        server.status("bob").await.regular_count,
        2,
        "nothing else taken"
    );
}
