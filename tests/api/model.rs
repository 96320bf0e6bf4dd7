//! Model-based property tests: random sequences of uploads (valid and invalid, with duplicates,
//! last-resort entries, readable packages of several suites and lifetimes, opaque ones),
//! consumptions with and without suite filters by a few callers (with and without
//! idempotency keys, under caller, pair and target budgets that each case draws), deletes and
//! reads for a few users, on a clock that moves so packages expire and budgets refill, applied
//! both to the store under test and to a plain in-memory model of the contract. Every observable result must match. Runs on the backend the suite
//! targets (SQLite, or Postgres with TEST_DATABASE_URL).

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use keypackage_server::{
    key_package::{Fingerprint, IdempotencyKey, UploadPolicy, UserId, MAX_REGULAR_PACKAGES},
    mls_codec,
    rate_limit::{Budget, Scope},
    store::{Caller, Claim, ConsumeOutcome, Consumed, KeyPackageStore, Status, Upload},
};
use proptest::{prelude::*, test_runner::TestRunner};
use sha2::{Digest, Sha256};

use crate::harness::TestDb;

/// The signature key of every readable package.
const KEY: &[u8] = &[7; 32];

/// The clock at step 0 (Unix seconds); each step is one second later.
const T0: i64 = 1_700_000_000;

/// How long a claim's idempotency key is remembered, in steps.
const KEY_TTL_SECS: i64 = 12;

/// The budgets of one case, per minute; `None` turns a per-caller stage off. They are small,
/// so that with one step per second buckets run dry and refill within a case.
#[derive(Clone, Copy, Debug)]
struct Budgets {
    caller: Option<u32>,
    pair: Option<u32>,
    target: u32,
}

fn budgets() -> impl Strategy<Value = Budgets> {
    (
        prop_oneof![Just(None), Just(Some(3)), Just(Some(6))],
        prop_oneof![Just(None), Just(Some(2))],
        prop_oneof![Just(4), Just(1_000_000)],
    )
        .prop_map(|(caller, pair, target)| Budgets {
            caller,
            pair,
            target,
        })
}

/// One entry of a generated upload.
#[derive(Clone, Debug)]
struct Entry {
    /// Small tag space so duplicates are frequent.
    tag: u8,
    last_resort: bool,
    /// When false the entry has a broken header, which must reject the whole upload.
    valid: bool,
    /// A readable package (suite and lifetime follow from the tag) rather than opaque bytes.
    readable: bool,
}

impl Entry {
    /// The suite of a readable entry: 1, 2 or 3.
    fn suite(&self) -> u16 {
        1 + u16::from(self.tag % 3)
    }

    /// The `not_after` of a readable entry: 10 to 50 seconds after step 0.
    fn not_after(&self) -> u64 {
        (T0 + 10 * (1 + i64::from(self.tag % 5))) as u64
    }

    /// Suite and `not_after`, for a readable entry.
    fn facts(&self) -> Option<(u16, u64)> {
        (self.valid && self.readable).then(|| (self.suite(), self.not_after()))
    }
}

#[derive(Clone, Debug)]
enum Op {
    Upload {
        user: usize,
        entries: Vec<Entry>,
        /// 0 = no fingerprint, 1..=2 = one of two valid ones, 3 = an invalid one.
        fingerprint: u8,
    },
    /// A consumption of `target`'s package accepting `suites` (empty: any), by nobody in
    /// particular (only the target's budget applies) or by one of three callers, who may send
    /// one of three idempotency keys.
    Consume {
        target: usize,
        suites: Vec<u16>,
        caller: Option<usize>,
        key: Option<u8>,
    },
    Delete(usize),
    Status(usize),
    Fingerprint(usize),
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        0u8..8,
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.97),
        prop::bool::weighted(0.6),
    )
        .prop_map(|(tag, last_resort, valid, readable)| Entry {
            tag,
            last_resort,
            valid,
            readable,
        })
}

fn suites() -> impl Strategy<Value = Vec<u16>> {
    prop_oneof![
        3 => Just(vec![]),
        1 => Just(vec![1]),
        1 => Just(vec![2, 3]),
        1 => Just(vec![4]),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..3, prop::collection::vec(entry(), 0..14), 0u8..4).prop_map(
            |(user, entries, fingerprint)| Op::Upload { user, entries, fingerprint }
        ),
        5 => (
            0usize..3,
            suites(),
            prop::option::weighted(0.8, 0usize..3),
            prop::option::weighted(0.5, 0u8..3),
        )
            .prop_map(|(target, suites, caller, key)| Op::Consume {
                target,
                suites,
                caller,
                key: key.filter(|_| caller.is_some()),
            }),
        1 => (0usize..3).prop_map(Op::Delete),
        1 => (0usize..3).prop_map(Op::Status),
        1 => (0usize..3).prop_map(Op::Fingerprint),
    ]
}

fn bytes_of(e: &Entry) -> Vec<u8> {
    if let Some((suite, not_after)) = e.facts() {
        return mls_codec::sample_key_package_of_suite(suite, &[b'r', e.tag], KEY, 0, not_after);
    }
    let mut v = if e.valid {
        vec![0, 1, 0, 5]
    } else {
        vec![0, 1, 0, 6]
    };
    // Tags share a prefix of varying length so that sizes differ too.
    v.extend(std::iter::repeat_n(b'k', usize::from(e.tag % 3)));
    v.push(e.tag);
    v
}

fn fingerprint_of(choice: u8) -> String {
    match choice {
        0 => String::new(),
        1 => Fingerprint::of_public_key(KEY).as_str().to_owned(),
        2 => "2".repeat(64),
        _ => "NOT-HEX".into(),
    }
}

/// A held package: bytes, the fingerprint recorded with it, and its suite and `not_after` if
/// readable.
type Held = (Vec<u8>, String, Option<(u16, u64)>);

/// Whether a held package is servable at `now`.
fn servable(held: &Held, now: i64) -> bool {
    held.2.is_none_or(|(_, not_after)| not_after > now as u64)
}

/// Whether a held package qualifies for a claim accepting `suites` (empty: any).
fn qualifies(held: &Held, suites: &[u16]) -> bool {
    suites.is_empty() || held.2.is_some_and(|(suite, _)| suites.contains(&suite))
}

/// The contract, written as plainly as possible.
#[derive(Default, Debug)]
struct UserModel {
    regular: VecDeque<Held>,
    last_resort: Option<Held>,
    handouts: u64,
    fingerprint: Option<(String, i64)>,
}

impl UserModel {
    /// Applies an upload; `Err` when the contract rejects it (then nothing changes).
    fn upload(&mut self, entries: &[Entry], fingerprint: &str, now: i64) -> Result<(), ()> {
        let valid_fp = fingerprint.is_empty()
            || (fingerprint.len() == 64
                && fingerprint
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        let readable = || entries.iter().filter_map(Entry::facts);
        if entries.is_empty()
            || entries.iter().any(|e| !e.valid)
            || entries.iter().filter(|e| e.last_resort).count() > 1
            || !valid_fp
            || readable().any(|(_, not_after)| not_after <= now as u64)
            || (!fingerprint.is_empty()
                && readable().next().is_some()
                && fingerprint != Fingerprint::of_public_key(KEY).as_str())
        {
            return Err(());
        }
        self.regular.retain(|held| servable(held, now));
        if !fingerprint.is_empty()
            && self.fingerprint.as_ref().map(|(f, _)| f.as_str()) != Some(fingerprint)
        {
            self.fingerprint = Some((fingerprint.to_owned(), now));
        }
        let held_before: Vec<Vec<u8>> = self
            .regular
            .iter()
            .chain(self.last_resort.iter())
            .map(|(b, _, _)| b.clone())
            .collect();
        let mut seen_in_request: Vec<Vec<u8>> = Vec::new();
        for e in entries {
            let bytes = bytes_of(e);
            let duplicate = held_before.contains(&bytes) || seen_in_request.contains(&bytes);
            seen_in_request.push(bytes.clone());
            if duplicate {
                continue;
            }
            let held = (bytes, fingerprint.to_owned(), e.facts());
            if e.last_resort {
                self.last_resort = Some(held);
                self.handouts = 0;
            } else {
                self.regular.push_back(held);
            }
        }
        while self.regular.len() > MAX_REGULAR_PACKAGES {
            self.regular.pop_front();
        }
        Ok(())
    }

    /// A consumption at `now`: the package and whether it is the last-resort one, or the
    /// outcome without a package (`Empty` or `Incompatible`).
    fn consume(&mut self, suites: &[u16], now: i64) -> Result<(Held, bool), ConsumeOutcome> {
        self.regular.retain(|held| servable(held, now));
        if let Some(i) = self.regular.iter().position(|h| qualifies(h, suites)) {
            return Ok((self.regular.remove(i).expect("present"), false));
        }
        let last_resort = self.last_resort.clone().filter(|h| servable(h, now));
        match last_resort {
            Some(held) if qualifies(&held, suites) => {
                self.handouts += 1;
                Ok((held, true))
            }
            Some(_) => Err(ConsumeOutcome::Incompatible),
            None if !self.regular.is_empty() => Err(ConsumeOutcome::Incompatible),
            None => Err(ConsumeOutcome::Empty),
        }
    }

    fn status(&self, now: i64) -> Status {
        let regular: Vec<&Held> = self.regular.iter().filter(|h| servable(h, now)).collect();
        let last_resort = self.last_resort.as_ref().filter(|h| servable(h, now));
        let mut suites = std::collections::BTreeMap::<u16, u32>::new();
        for held in &regular {
            *suites.entry(held.2.map_or(0, |(s, _)| s)).or_default() += 1;
        }
        let inventory_digest = if regular.is_empty() && last_resort.is_none() {
            Vec::new()
        } else {
            let mut outer = Sha256::new();
            for held in regular.iter().copied().chain(last_resort) {
                outer.update(Sha256::digest(&held.0));
            }
            outer.finalize().to_vec()
        };
        Status {
            regular_count: regular.len() as u32,
            has_last_resort: last_resort.is_some(),
            fingerprint: self
                .fingerprint
                .as_ref()
                .map(|(f, _)| Fingerprint::parse(f).expect("valid")),
            last_resort_handouts: self.handouts,
            cipher_suites: suites.into_iter().collect(),
            next_expiry: regular
                .iter()
                .filter_map(|h| h.2.map(|(_, t)| t))
                .min()
                .unwrap_or(0),
            last_resort_not_after: last_resort.and_then(|h| h.2).map_or(0, |(_, t)| t),
            inventory_digest,
        }
    }
}

/// A token bucket, kept in µs of refill time: a request costs one interval and needs a whole
/// one available. (The store's GCRA arithmetic must agree with this plainer form.)
#[derive(Debug)]
struct Bucket {
    available_us: i64,
    at_us: i64,
}

/// Every stage's buckets and the remembered claims, as the contract describes them.
#[derive(Default, Debug)]
struct ClaimModel {
    /// By stage and subject: a caller, a caller and target, or a target.
    buckets: HashMap<(Scope, (Option<usize>, usize)), Bucket>,
    /// By caller and key: the target, when the record expires, and what was handed out.
    replays: HashMap<(usize, u8), (usize, i64, Held, bool)>,
}

impl ClaimModel {
    /// The time until `per_minute`'s bucket for `subject` holds one request, `None` if it does.
    fn wait(
        &self,
        scope: Scope,
        subject: (Option<usize>, usize),
        per_minute: u32,
        now_us: i64,
    ) -> Option<i64> {
        let interval = 60_000_000 / i64::from(per_minute);
        let full = interval * i64::from(per_minute);
        let available = self
            .buckets
            .get(&(scope, subject))
            .map_or(full, |b| (b.available_us + (now_us - b.at_us)).min(full));
        (available < interval).then_some(interval - available)
    }

    fn charge(
        &mut self,
        scope: Scope,
        subject: (Option<usize>, usize),
        per_minute: u32,
        now_us: i64,
    ) {
        let interval = 60_000_000 / i64::from(per_minute);
        let full = interval * i64::from(per_minute);
        let bucket = self.buckets.entry((scope, subject)).or_insert(Bucket {
            available_us: full,
            at_us: now_us,
        });
        bucket.available_us = (bucket.available_us + (now_us - bucket.at_us)).min(full) - interval;
        bucket.at_us = now_us;
    }

    /// The stages in order, caller, pair, target: the first that refuses answers, and then
    /// none is charged; otherwise all are.
    fn admit(
        &mut self,
        budgets: Budgets,
        caller: Option<usize>,
        target: usize,
        now_us: i64,
    ) -> Result<(), ConsumeOutcome> {
        let mut stages = Vec::new();
        if let (Some(c), Some(per_minute)) = (caller, budgets.caller) {
            stages.push((Scope::Caller, (Some(c), usize::MAX), per_minute));
        }
        if let (Some(c), Some(per_minute)) = (caller, budgets.pair) {
            stages.push((Scope::Pair, (Some(c), target), per_minute));
        }
        stages.push((Scope::Target, (None, target), budgets.target));
        for &(scope, subject, per_minute) in &stages {
            if let Some(wait) = self.wait(scope, subject, per_minute, now_us) {
                return Err(ConsumeOutcome::RateLimited {
                    retry_after: std::time::Duration::from_micros(wait as u64),
                    scope,
                });
            }
        }
        for (scope, subject, per_minute) in stages {
            self.charge(scope, subject, per_minute, now_us);
        }
        Ok(())
    }
}

/// What the model expects of a consumption: a package (replayed or not) or an outcome
/// without one.
enum Expected {
    Package {
        held: Held,
        last_resort: bool,
        replayed: bool,
    },
    Other(ConsumeOutcome),
}

/// Compares a package the store handed out with the model's.
fn same_package(
    step: usize,
    c: &Consumed,
    held: &Held,
    last_resort: bool,
) -> Result<(), TestCaseError> {
    let (bytes, fp, facts) = held;
    prop_assert_eq!(&c.key_package.to_vec(), bytes, "step {}: bytes", step);
    prop_assert_eq!(c.is_last_resort, last_resort, "step {}: flag", step);
    let got_fp = c
        .fingerprint
        .as_ref()
        .map(|f| f.as_str().to_owned())
        .unwrap_or_default();
    prop_assert_eq!(&got_fp, fp, "step {}: package fingerprint", step);
    let got_facts = c.facts.as_ref().map(|f| (f.cipher_suite, f.not_after));
    prop_assert_eq!(&got_facts, facts, "step {}: facts", step);
    Ok(())
}

async fn check(
    store: &dyn KeyPackageStore,
    case: u64,
    budgets: Budgets,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let users: Vec<UserId> = (0..3)
        .map(|i| UserId::parse(&format!("case{case}-user{i}")).expect("valid id"))
        .collect();
    let callers: Vec<UserId> = (0..3)
        .map(|i| UserId::parse(&format!("case{case}-caller{i}")).expect("valid id"))
        .collect();
    let keys: Vec<IdempotencyKey> = (0..3)
        .map(|i| IdempotencyKey::parse(format!("key-{i}").as_bytes()).expect("valid key"))
        .collect();
    let mut model: HashMap<usize, UserModel> = HashMap::new();
    let mut claims = ClaimModel::default();
    let ttl = std::time::Duration::from_secs(KEY_TTL_SECS as u64);
    for (step, op) in ops.into_iter().enumerate() {
        let now = T0 + step as i64;
        match op {
            Op::Upload {
                user,
                entries,
                fingerprint,
            } => {
                let fp = fingerprint_of(fingerprint);
                let parsed = Upload::parse(
                    entries
                        .iter()
                        .map(|e| (Bytes::from(bytes_of(e)), e.last_resort)),
                    &fp,
                    now as u64,
                    UploadPolicy::default(),
                );
                let expected = model.entry(user).or_default().upload(&entries, &fp, now);
                match parsed {
                    Err(_) => prop_assert!(
                        expected.is_err(),
                        "step {step}: store rejected a valid upload"
                    ),
                    Ok(upload) => {
                        prop_assert!(
                            expected.is_ok(),
                            "step {step}: store accepted an invalid upload"
                        );
                        let outcome = store
                            .upload(&users[user], &upload, now)
                            .await
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        prop_assert_eq!(
                            outcome.status,
                            model[&user].status(now),
                            "step {}: upload status",
                            step
                        );
                    }
                }
            }
            Op::Consume {
                target,
                suites,
                caller,
                key,
            } => {
                let now_us = now * 1_000_000;
                let claim = Claim {
                    caller: caller.map(|c| Caller {
                        id: &callers[c],
                        budget: budgets.caller.map(Budget::per_minute),
                        pair_budget: budgets.pair.map(Budget::per_minute),
                        idempotency: key.map(|k| (&keys[usize::from(k)], ttl)),
                    }),
                    suites: &suites,
                    now_us: Some(now_us),
                    ..Claim::new(&users[target], Budget::per_minute(budgets.target))
                };
                let got = store
                    .consume(&claim)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?
                    .outcome;

                let remembered = caller
                    .zip(key)
                    .and_then(|ck| claims.replays.get(&ck))
                    .filter(|(_, expires, _, _)| now_us < *expires);
                let expected = match remembered {
                    Some((t, ..)) if *t != target => Expected::Other(ConsumeOutcome::KeyReused),
                    Some((_, _, held, last_resort)) => Expected::Package {
                        held: held.clone(),
                        last_resort: *last_resort,
                        replayed: true,
                    },
                    None => match claims.admit(budgets, caller, target, now_us) {
                        Err(refused) => Expected::Other(refused),
                        Ok(()) => match model.entry(target).or_default().consume(&suites, now) {
                            Err(outcome) => Expected::Other(outcome),
                            Ok((held, last_resort)) => {
                                if let Some(ck) = caller.zip(key) {
                                    let record = (
                                        target,
                                        now_us + KEY_TTL_SECS * 1_000_000,
                                        held.clone(),
                                        last_resort,
                                    );
                                    claims.replays.insert(ck, record);
                                }
                                Expected::Package {
                                    held,
                                    last_resort,
                                    replayed: false,
                                }
                            }
                        },
                    },
                };
                match (got, expected) {
                    (
                        ConsumeOutcome::Consumed(c),
                        Expected::Package {
                            held,
                            last_resort,
                            replayed: false,
                        },
                    )
                    | (
                        ConsumeOutcome::Replayed(c),
                        Expected::Package {
                            held,
                            last_resort,
                            replayed: true,
                        },
                    ) => same_package(step, &c, &held, last_resort)?,
                    (got, Expected::Other(expected)) if got == expected => {}
                    (got, Expected::Other(expected)) => {
                        return Err(TestCaseError::fail(format!(
                            "step {step}: store gave {got:?}, model {expected:?}"
                        )))
                    }
                    (got, Expected::Package { replayed, .. }) => {
                        return Err(TestCaseError::fail(format!(
                            "step {step}: store gave {got:?}, model a package (replayed: {replayed})"
                        )))
                    }
                }
            }
            Op::Delete(user) => {
                store
                    .delete_all(&users[user])
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let m = model.entry(user).or_default();
                m.regular.clear();
                m.last_resort = None;
                m.handouts = 0;
            }
            Op::Status(user) => {
                let got = store
                    .status(&users[user], now)
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(
                    got,
                    model.entry(user).or_default().status(now),
                    "step {}: status",
                    step
                );
            }
            Op::Fingerprint(user) => {
                let got = store
                    .fingerprint(&users[user])
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?
                    .map(|(f, at)| (f.as_str().to_owned(), at));
                prop_assert_eq!(
                    got,
                    model.entry(user).or_default().fingerprint.clone(),
                    "step {}: fingerprint",
                    step
                );
            }
        }
    }
    Ok(())
}

fn run_model(cases: u32, ops: std::ops::Range<usize>, regressions: Vec<Vec<Op>>) {
    let unlimited = Budgets {
        caller: None,
        pair: None,
        target: 1_000_000,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let db = rt.block_on(TestDb::new());
    let store = rt.block_on(db.store());
    let counter = std::sync::atomic::AtomicU64::new(0);
    let next_case = || counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    for ops in regressions {
        if let Err(e) = rt.block_on(check(store.as_ref(), next_case(), unlimited, ops)) {
            panic!("regression case failed: {e}");
        }
    }
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(
        &(budgets(), prop::collection::vec(op(), ops)),
        |(budgets, ops)| {
            // Each case gets its own users and callers, so cases never see each other's state.
            rt.block_on(check(store.as_ref(), next_case(), budgets, ops))
        },
    );
    drop(store);
    rt.block_on(async move { drop(db) });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn store_matches_the_model_of_the_contract_for_random_operation_sequences() {
    let default = if crate::harness::postgres_admin_url().is_some() {
        48
    } else {
        96
    };
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    run_model(cases, 1..40, regression_cases());
}

/// Shrunk failures found by the property test, kept as fixed cases.
fn regression_cases() -> Vec<Vec<Op>> {
    let e = |tag, last_resort| Entry {
        tag,
        last_resort,
        valid: true,
        readable: false,
    };
    vec![
        // A last-resort entry identical to a held regular package is skipped.
        vec![
            Op::Upload {
                user: 0,
                entries: vec![e(1, false)],
                fingerprint: 0,
            },
            Op::Upload {
                user: 0,
                entries: vec![e(1, true)],
                fingerprint: 1,
            },
            Op::Status(0),
            Op::Consume {
                target: 0,
                suites: vec![],
                caller: None,
                key: None,
            },
            Op::Consume {
                target: 0,
                suites: vec![],
                caller: None,
                key: None,
            },
        ],
        // Twelve distinct entries in one upload keep only the newest ten.
        vec![
            Op::Upload {
                user: 1,
                entries: (0..8).map(|t| e(t, false)).collect(),
                fingerprint: 2,
            },
            Op::Upload {
                user: 1,
                entries: vec![e(0, false), e(9, false), e(10, false), e(11, false)],
                fingerprint: 0,
            },
            Op::Consume {
                target: 1,
                suites: vec![],
                caller: None,
                key: None,
            },
            Op::Status(1),
            Op::Fingerprint(1),
        ],
    ]
}
