-- One row per user who ever uploaded: current fingerprint and the last-resort package.
-- Uploads lock this row first, which serialises one user's uploads across all processes.
CREATE TABLE users (
    user_id                 TEXT PRIMARY KEY,
    fingerprint             TEXT,
    fingerprint_updated_at  BIGINT,
    last_resort             BYTEA,
    last_resort_digest      BYTEA,
    last_resort_fingerprint TEXT NOT NULL DEFAULT '',
    last_resort_handouts    BIGINT NOT NULL DEFAULT 0
);

-- Single-use packages; `id` grows with upload order, so the smallest id is the oldest (FIFO).
-- Keep the sequence's default CACHE 1: a later upload (it waits for the user's row lock) must
-- draw larger ids than an earlier one from any session, which per-session caches would break.
CREATE TABLE key_packages (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id     TEXT NOT NULL,
    digest      BYTEA NOT NULL,
    data        BYTEA NOT NULL,
    fingerprint TEXT NOT NULL DEFAULT '',
    UNIQUE (user_id, digest)
);
CREATE INDEX key_packages_user_fifo ON key_packages (user_id, id);

-- Shared consumption budget: GCRA theoretical arrival time (ms since the epoch) per target.
CREATE TABLE consume_budgets (
    user_id TEXT PRIMARY KEY,
    tat     BIGINT NOT NULL
);
CREATE INDEX consume_budgets_tat ON consume_budgets (tat);
