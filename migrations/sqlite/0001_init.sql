-- One row per user who ever uploaded: current fingerprint and the last-resort package.
CREATE TABLE users (
    user_id                 TEXT PRIMARY KEY NOT NULL,
    fingerprint             TEXT,
    fingerprint_updated_at  INTEGER,
    last_resort             BLOB,
    last_resort_digest      BLOB,
    last_resort_fingerprint TEXT NOT NULL DEFAULT '',
    last_resort_handouts    INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Single-use packages; `id` grows with upload order, so the smallest id is the oldest (FIFO).
CREATE TABLE key_packages (
    id          INTEGER PRIMARY KEY,
    user_id     TEXT NOT NULL,
    digest      BLOB NOT NULL,
    data        BLOB NOT NULL,
    fingerprint TEXT NOT NULL DEFAULT '',
    UNIQUE (user_id, digest)
);
CREATE INDEX key_packages_user_fifo ON key_packages (user_id, id);

-- Shared consumption budget: GCRA theoretical arrival time (ms since the epoch) per target.
CREATE TABLE consume_budgets (
    user_id TEXT PRIMARY KEY NOT NULL,
    tat     INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX consume_budgets_tat ON consume_budgets (tat);
