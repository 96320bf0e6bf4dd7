-- v1.1: fair and idempotent claims.
--
-- Budgets of every stage in one table, one GCRA mechanism: scope 0 is a target's budget
-- (subject: the target), 1 a caller's (subject: the caller), 2 a caller->target pair's
-- (subject: caller, a space, target; user ids never contain spaces).
ALTER TABLE consume_budgets RENAME COLUMN user_id TO subject;
ALTER TABLE consume_budgets ADD COLUMN scope SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE consume_budgets DROP CONSTRAINT consume_budgets_pkey;
ALTER TABLE consume_budgets ADD PRIMARY KEY (scope, subject);

-- What a claim with an Idempotency-Key handed out, kept until expires_us for the caller's
-- retries. Written in the transaction of the hand-out, so a crash after the commit replays
-- the package instead of handing out another.
CREATE TABLE claim_replays (
    caller          TEXT NOT NULL,
    idem_key        TEXT NOT NULL,
    target          TEXT NOT NULL,
    expires_us      BIGINT NOT NULL,
    data            BYTEA NOT NULL,
    fingerprint     TEXT NOT NULL,
    is_last_resort  BOOLEAN NOT NULL,
    cipher_suite    INTEGER,
    not_after       BYTEA,
    key_package_ref BYTEA,
    PRIMARY KEY (caller, idem_key)
);
CREATE INDEX claim_replays_expiry ON claim_replays (expires_us);

-- Locks the budget row (scope, subject), creating it on first use, and judges one more
-- request by GCRA at the database's clock read after the lock (or p_now_us), charging nothing:
-- the tat to store if the claim goes ahead, and the wait (0 when it may). A stored tat ahead of
-- now + window (a clock that ran ahead) is cut back to now + window at once, so it locks the
-- bucket for one refill interval at most.
CREATE FUNCTION kps_budget(p_scope smallint, p_subject text, p_interval_us bigint,
                           p_window_us bigint, p_now_us bigint,
                           OUT wait_us bigint, OUT next_tat_us bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_tat bigint;
    v_now bigint;
BEGIN
    SELECT b.tat_us INTO v_tat FROM consume_budgets b
    WHERE b.scope = p_scope AND b.subject = p_subject FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO consume_budgets (scope, subject, tat_us) VALUES (p_scope, p_subject, 0)
        ON CONFLICT (scope, subject) DO NOTHING;
        SELECT b.tat_us INTO v_tat FROM consume_budgets b
        WHERE b.scope = p_scope AND b.subject = p_subject FOR UPDATE;
    END IF;
    v_now := COALESCE(p_now_us, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
    IF v_tat > v_now + p_window_us THEN
        v_tat := v_now + p_window_us;
        UPDATE consume_budgets SET tat_us = v_tat WHERE scope = p_scope AND subject = p_subject;
    END IF;
    next_tat_us := GREATEST(v_tat, v_now) + p_interval_us;
    wait_us := GREATEST(next_tat_us - (v_now + p_window_us), 0);
END
$$;

-- One claim, atomically and in one round trip. Each statement of a PL/pgSQL function takes a
-- fresh snapshot, so every step sees what was committed before the locks it waited for.
--
-- 1. With a key: take the caller's key. A committed, unexpired record answers at once (the
--    same target: replay; another: reused), charging nothing. A concurrent claim with the same
--    key holds the key's row until it ends; this one waits, then replays what it handed out.
-- 2. Judge the budgets in order, caller (scope 1), pair (2), target (0), each locked first
--    (every claim locks them in this order, so claims never wait in a cycle); the first that
--    refuses answers, and a refused claim is charged at no stage, before or after it. Once all
--    pass, all are charged. NULL intervals turn a stage off.
-- 3. Share-lock the target's user row (an upload or delete in flight finishes first), remove
--    its expired regular packages, hand out the oldest one of p_suites (NULL: any), or else
--    count a hand-out of its last-resort package if that has not expired and qualifies.
-- 4. With a key and a package handed out: record it for p_ttl_us; otherwise drop the key.
--
-- Returns one row; `outcome` is package, replayed, reused, empty, incompatible, or the refusing
-- stage (caller, pair, target) with wait_us.
DROP FUNCTION kps_consume(text, bigint, bigint, bigint, integer[]);
CREATE FUNCTION kps_claim(p_target text, p_caller text, p_key text, p_ttl_us bigint,
                          p_now_us bigint, p_suites integer[],
                          p_target_interval bigint, p_target_window bigint,
                          p_caller_interval bigint, p_caller_window bigint,
                          p_pair_interval bigint, p_pair_window bigint)
RETURNS TABLE (outcome text, wait_us bigint, expired_removed bigint, kp_data bytea,
               kp_fingerprint text, kp_is_last_resort boolean, kp_cipher_suite integer,
               kp_not_after bytea, kp_ref bytea)
LANGUAGE plpgsql AS $$
DECLARE
    v_now bigint;
    v_wait bigint;
    v_caller_tat bigint;
    v_pair_tat bigint;
    v_target_tat bigint;
    v_now_key bytea;
    v_expired bigint := 0;
    v_replay claim_replays%ROWTYPE;
    v_data bytea;
    v_fingerprint text;
    v_last_resort boolean;
    v_suite integer;
    v_not_after bytea;
    v_ref bytea;
BEGIN
    IF p_key IS NOT NULL THEN
        v_now := COALESCE(p_now_us, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
        INSERT INTO claim_replays AS r (caller, idem_key, target, expires_us, data, fingerprint,
                                        is_last_resort)
        VALUES (p_caller, p_key, p_target, v_now + p_ttl_us, ''::bytea, '', false)
        ON CONFLICT (caller, idem_key) DO NOTHING;
        IF NOT FOUND THEN
            SELECT * INTO v_replay FROM claim_replays r
            WHERE r.caller = p_caller AND r.idem_key = p_key FOR UPDATE;
            IF v_replay.expires_us > v_now THEN
                IF v_replay.target <> p_target THEN
                    RETURN QUERY SELECT 'reused'::text, NULL::bigint, 0::bigint, NULL::bytea,
                        NULL::text, NULL::boolean, NULL::integer, NULL::bytea, NULL::bytea;
                    RETURN;
                END IF;
                RETURN QUERY SELECT 'replayed'::text, NULL::bigint, 0::bigint, v_replay.data,
                    v_replay.fingerprint, v_replay.is_last_resort, v_replay.cipher_suite,
                    v_replay.not_after, v_replay.key_package_ref;
                RETURN;
            END IF;
            -- Expired: the key is free again, and now held by this claim.
            UPDATE claim_replays r SET target = p_target, expires_us = v_now + p_ttl_us
            WHERE r.caller = p_caller AND r.idem_key = p_key;
        END IF;
    END IF;

    -- Every stage is judged before any is charged: a refused claim charges none of them.
    IF p_caller_interval IS NOT NULL THEN
        SELECT * INTO v_wait, v_caller_tat
        FROM kps_budget(1::smallint, p_caller, p_caller_interval, p_caller_window, p_now_us);
        IF v_wait > 0 THEN
            DELETE FROM claim_replays r WHERE r.caller = p_caller AND r.idem_key = p_key;
            RETURN QUERY SELECT 'caller'::text, v_wait, 0::bigint, NULL::bytea, NULL::text,
                NULL::boolean, NULL::integer, NULL::bytea, NULL::bytea;
            RETURN;
        END IF;
    END IF;
    IF p_pair_interval IS NOT NULL THEN
        SELECT * INTO v_wait, v_pair_tat
        FROM kps_budget(2::smallint, p_caller || ' ' || p_target, p_pair_interval,
                        p_pair_window, p_now_us);
        IF v_wait > 0 THEN
            DELETE FROM claim_replays r WHERE r.caller = p_caller AND r.idem_key = p_key;
            RETURN QUERY SELECT 'pair'::text, v_wait, 0::bigint, NULL::bytea, NULL::text,
                NULL::boolean, NULL::integer, NULL::bytea, NULL::bytea;
            RETURN;
        END IF;
    END IF;
    SELECT * INTO v_wait, v_target_tat
    FROM kps_budget(0::smallint, p_target, p_target_interval, p_target_window, p_now_us);
    IF v_wait > 0 THEN
        DELETE FROM claim_replays r WHERE r.caller = p_caller AND r.idem_key = p_key;
        RETURN QUERY SELECT 'target'::text, v_wait, 0::bigint, NULL::bytea, NULL::text,
            NULL::boolean, NULL::integer, NULL::bytea, NULL::bytea;
        RETURN;
    END IF;
    UPDATE consume_budgets b SET tat_us = v_caller_tat
    WHERE v_caller_tat IS NOT NULL AND b.scope = 1 AND b.subject = p_caller;
    UPDATE consume_budgets b SET tat_us = v_pair_tat
    WHERE v_pair_tat IS NOT NULL AND b.scope = 2 AND b.subject = p_caller || ' ' || p_target;
    UPDATE consume_budgets b SET tat_us = v_target_tat WHERE b.scope = 0 AND b.subject = p_target;

    PERFORM 1 FROM users u WHERE u.user_id = p_target FOR SHARE;
    v_now := COALESCE(p_now_us, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
    -- Unix seconds as 8 big-endian bytes, comparable with not_after (see 0003).
    v_now_key := int8send(GREATEST(v_now, 0) / 1000000);
    DELETE FROM key_packages k WHERE k.user_id = p_target AND k.not_after <= v_now_key;
    GET DIAGNOSTICS v_expired = ROW_COUNT;

    DELETE FROM key_packages k
    WHERE k.id = (SELECT p.id FROM key_packages p
                  WHERE p.user_id = p_target
                    AND (p_suites IS NULL OR p.cipher_suite = ANY (p_suites))
                  ORDER BY p.id LIMIT 1)
    RETURNING k.data, k.fingerprint, false, k.cipher_suite, k.not_after, k.key_package_ref
    INTO v_data, v_fingerprint, v_last_resort, v_suite, v_not_after, v_ref;
    IF NOT FOUND THEN
        UPDATE users u SET last_resort_handouts = u.last_resort_handouts + 1
        WHERE u.user_id = p_target AND u.last_resort IS NOT NULL
          AND (u.last_resort_not_after IS NULL OR u.last_resort_not_after > v_now_key)
          AND (p_suites IS NULL OR u.last_resort_cipher_suite = ANY (p_suites))
        RETURNING u.last_resort, u.last_resort_fingerprint, true, u.last_resort_cipher_suite,
                  u.last_resort_not_after, u.last_resort_ref
        INTO v_data, v_fingerprint, v_last_resort, v_suite, v_not_after, v_ref;
    END IF;
    IF v_data IS NULL THEN
        DELETE FROM claim_replays r WHERE r.caller = p_caller AND r.idem_key = p_key;
        RETURN QUERY SELECT
            CASE WHEN EXISTS (SELECT FROM key_packages p WHERE p.user_id = p_target)
                   OR EXISTS (SELECT FROM users u WHERE u.user_id = p_target
                              AND u.last_resort IS NOT NULL
                              AND (u.last_resort_not_after IS NULL
                                   OR u.last_resort_not_after > v_now_key))
                 THEN 'incompatible' ELSE 'empty' END,
            NULL::bigint, v_expired, NULL::bytea, NULL::text, NULL::boolean, NULL::integer,
            NULL::bytea, NULL::bytea;
        RETURN;
    END IF;
    IF p_key IS NOT NULL THEN
        UPDATE claim_replays r
        SET data = v_data, fingerprint = v_fingerprint, is_last_resort = v_last_resort,
            cipher_suite = v_suite, not_after = v_not_after, key_package_ref = v_ref
        WHERE r.caller = p_caller AND r.idem_key = p_key;
    END IF;
    RETURN QUERY SELECT 'package'::text, NULL::bigint, v_expired, v_data, v_fingerprint,
        v_last_resort, v_suite, v_not_after, v_ref;
END
$$;
