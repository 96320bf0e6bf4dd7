//! Model-based property tests: random sequences of uploads (valid and invalid, with duplicates
//! and last-resort entries), consumptions, deletes and reads for a few users, applied both to the
//! store under test and to a plain in-memory model of the contract. Every observable result must
//! match. Runs on the backend the suite targets (SQLite, or Postgres with TEST_DATABASE_URL).

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;
use keypackage_server::{
    key_package::{UploadPolicy, UserId, MAX_REGULAR_PACKAGES},
    rate_limit::Budget,
    store::{ConsumeOutcome, KeyPackageStore, Upload},
};
use proptest::{prelude::*, test_runner::TestRunner};

use crate::harness::TestDb;

/// One entry of a generated upload.
#[derive(Clone, Debug)]
struct Entry {
    /// Small tag space so duplicates are frequent.
    tag: u8,
    last_resort: bool,
    /// When false the entry has a broken header, which must reject the whole upload.
    valid: bool,
}

#[derive(Clone, Debug)]
enum Op {
    Upload {
        user: usize,
        entries: Vec<Entry>,
        /// 0 = no fingerprint, 1..=2 = one of two valid ones, 3 = an invalid one.
        fingerprint: u8,
    },
    Consume(usize),
    Delete(usize),
    Status(usize),
    Fingerprint(usize),
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        0u8..8,
        prop::bool::weighted(0.15),
        prop::bool::weighted(0.97),
    )
        .prop_map(|(tag, last_resort, valid)| Entry {
            tag,
            last_resort,
            valid,
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0usize..3, prop::collection::vec(entry(), 0..14), 0u8..4).prop_map(
            |(user, entries, fingerprint)| Op::Upload { user, entries, fingerprint }
        ),
        4 => (0usize..3).prop_map(Op::Consume),
        1 => (0usize..3).prop_map(Op::Delete),
        1 => (0usize..3).prop_map(Op::Status),
        1 => (0usize..3).prop_map(Op::Fingerprint),
    ]
}

fn bytes_of(e: &Entry) -> Vec<u8> {
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
        1 => "1".repeat(64),
        2 => "2".repeat(64),
        _ => "NOT-HEX".into(),
    }
}

/// The contract, written as plainly as possible.
#[derive(Default, Debug)]
struct UserModel {
    regular: VecDeque<(Vec<u8>, String)>,
    last_resort: Option<(Vec<u8>, String)>,
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
        if entries.is_empty()
            || entries.iter().any(|e| !e.valid)
            || entries.iter().filter(|e| e.last_resort).count() > 1
            || !valid_fp
        {
            return Err(());
        }
        if !fingerprint.is_empty()
            && self.fingerprint.as_ref().map(|(f, _)| f.as_str()) != Some(fingerprint)
        {
            self.fingerprint = Some((fingerprint.to_owned(), now));
        }
        let held_before: Vec<Vec<u8>> = self
            .regular
            .iter()
            .map(|(b, _)| b.clone())
            .chain(self.last_resort.iter().map(|(b, _)| b.clone()))
            .collect();
        let mut seen_in_request: Vec<Vec<u8>> = Vec::new();
        for e in entries {
            let bytes = bytes_of(e);
            let duplicate = held_before.contains(&bytes) || seen_in_request.contains(&bytes);
            seen_in_request.push(bytes.clone());
            if duplicate {
                continue;
            }
            if e.last_resort {
                self.last_resort = Some((bytes, fingerprint.to_owned()));
                self.handouts = 0;
            } else {
                self.regular.push_back((bytes, fingerprint.to_owned()));
            }
        }
        while self.regular.len() > MAX_REGULAR_PACKAGES {
            self.regular.pop_front();
        }
        Ok(())
    }

    fn consume(&mut self) -> Option<(Vec<u8>, bool, String)> {
        if let Some((bytes, fp)) = self.regular.pop_front() {
            return Some((bytes, false, fp));
        }
        let (bytes, fp) = self.last_resort.clone()?;
        self.handouts += 1;
        Some((bytes, true, fp))
    }

    fn status(&self) -> (u32, bool, String, u64) {
        (
            self.regular.len() as u32,
            self.last_resort.is_some(),
            self.fingerprint.clone().map(|(f, _)| f).unwrap_or_default(),
            self.handouts,
        )
    }
}

async fn check(store: &dyn KeyPackageStore, case: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let users: Vec<UserId> = (0..3)
        .map(|i| UserId::parse(&format!("case{case}-user{i}")).expect("valid id"))
        .collect();
    let mut model: HashMap<usize, UserModel> = HashMap::new();
    let budget = Budget::per_minute(1_000_000);
    for (step, op) in ops.into_iter().enumerate() {
        let now = 1_000 + step as i64;
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
                    0,
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
                        let s = outcome.status;
                        let got = (
                            s.regular_count,
                            s.has_last_resort,
                            s.fingerprint
                                .map(|f| f.as_str().to_owned())
                                .unwrap_or_default(),
                            s.last_resort_handouts,
                        );
                        prop_assert_eq!(got, model[&user].status(), "step {}: upload status", step);
                    }
                }
            }
            Op::Consume(user) => {
                let got = store
                    .consume(&users[user], budget, Some(now * 1_000_000))
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let expected = model.entry(user).or_default().consume();
                match (got, expected) {
                    (ConsumeOutcome::Consumed(c), Some((bytes, last_resort, fp))) => {
                        prop_assert_eq!(c.key_package.to_vec(), bytes, "step {}: bytes", step);
                        prop_assert_eq!(c.is_last_resort, last_resort, "step {}: flag", step);
                        let got_fp = c
                            .fingerprint
                            .map(|f| f.as_str().to_owned())
                            .unwrap_or_default();
                        prop_assert_eq!(got_fp, fp, "step {}: package fingerprint", step);
                    }
                    (ConsumeOutcome::Empty, None) => {}
                    (got, expected) => {
                        return Err(TestCaseError::fail(format!(
                            "step {step}: store gave {got:?}, model {expected:?}"
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
                let s = store
                    .status(&users[user])
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let got = (
                    s.regular_count,
                    s.has_last_resort,
                    s.fingerprint
                        .map(|f| f.as_str().to_owned())
                        .unwrap_or_default(),
                    s.last_resort_handouts,
                );
                prop_assert_eq!(
                    got,
                    model.entry(user).or_default().status(),
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
        if let Err(e) = rt.block_on(check(store.as_ref(), next_case(), ops)) {
            panic!("regression case failed: {e}");
        }
    }
    let mut runner = TestRunner::new(ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let result = runner.run(&prop::collection::vec(op(), ops), |ops| {
        // Each case gets its own users, so cases never see each other's state.
        rt.block_on(check(store.as_ref(), next_case(), ops))
    });
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
            Op::Consume(0),
            Op::Consume(0),
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
            Op::Consume(1),
            Op::Status(1),
            Op::Fingerprint(1),
        ],
    ]
}
