-- v1.1: fair and idempotent claims (see the Postgres migration of the same number).
--
-- Budgets of every stage in one table: scope 0 is a target's budget (subject: the target),
-- 1 a caller's (subject: the caller), 2 a caller->target pair's (subject: caller, a space,
-- target; user ids never contain spaces).
CREATE TABLE claim_budgets (
    scope   INTEGER NOT NULL,
    subject TEXT NOT NULL,
    tat_us  INTEGER NOT NULL,
    PRIMARY KEY (scope, subject)
) WITHOUT ROWID;
INSERT INTO claim_budgets (scope, subject, tat_us) SELECT 0, user_id, tat_us FROM consume_budgets;
DROP TABLE consume_budgets;
ALTER TABLE claim_budgets RENAME TO consume_budgets;
CREATE INDEX consume_budgets_tat ON consume_budgets (tat_us);

-- What a claim with an Idempotency-Key handed out, kept until expires_us for the caller's
-- retries; written in the transaction of the hand-out.
CREATE TABLE claim_replays (
    caller          TEXT NOT NULL,
    idem_key        TEXT NOT NULL,
    target          TEXT NOT NULL,
    expires_us      INTEGER NOT NULL,
    data            BLOB NOT NULL,
    fingerprint     TEXT NOT NULL,
    is_last_resort  INTEGER NOT NULL,
    cipher_suite    INTEGER,
    not_after       BLOB,
    key_package_ref BLOB,
    PRIMARY KEY (caller, idem_key)
) WITHOUT ROWID;
CREATE INDEX claim_replays_expiry ON claim_replays (expires_us);
