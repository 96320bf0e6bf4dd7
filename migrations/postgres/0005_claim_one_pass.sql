-- The claim of 0004 in fewer statements, same semantics: the budget judge is called as an
-- expression instead of a query, the stages that passed are charged in one UPDATE, and the
-- sweep of expired packages, the pick and the last-resort fallback are one statement. A
-- claim without a key that passes its budgets runs four statements, as v1's consume did.
--
-- Both functions plan once per session, without sequential scans: every statement in them
-- looks rows up by key, so a plan for the values at hand is no better than the generic one.
-- Left to choose, Postgres re-planned the sweep-and-pick statement on every call while the
-- tables had no statistics yet (0.4 ms of database CPU per claim, more than the claim itself),
-- and a plan made while a table was nearly empty (a new deployment, consume_budgets after
-- pruning) kept scanning the whole table as it grew, until autovacuum's next ANALYZE.
--
-- The sweep finds a user's expired packages by this index, so a claim whose target holds
-- none reads no package but the one it hands out (0004 read every package of the target).
CREATE INDEX key_packages_user_expiry ON key_packages (user_id, not_after)
    WHERE not_after IS NOT NULL;
DROP FUNCTION kps_claim(text, text, text, bigint, bigint, integer[], bigint, bigint, bigint,
                        bigint, bigint, bigint);
DROP FUNCTION kps_budget(smallint, text, bigint, bigint, bigint);

-- FIFO by a per-user counter instead of the database-wide identity: `seq` numbers one user's
-- packages in upload order, drawn from users.next_seq under the row lock every upload takes,
-- so no statement needs a sequence shared by all users (and the tables can be distributed by
-- user_id). Existing packages keep their order.
ALTER TABLE users ADD COLUMN next_seq BIGINT NOT NULL DEFAULT 1;
ALTER TABLE key_packages ADD COLUMN seq BIGINT;
UPDATE key_packages k SET seq = o.n
FROM (SELECT id, row_number() OVER (PARTITION BY user_id ORDER BY id) AS n
      FROM key_packages) AS o
WHERE k.id = o.id;
UPDATE users u SET next_seq = m.n + 1
FROM (SELECT user_id, max(seq) AS n FROM key_packages GROUP BY user_id) AS m
WHERE m.user_id = u.user_id;
ALTER TABLE key_packages ALTER COLUMN seq SET NOT NULL;
DROP INDEX key_packages_unread;
DROP INDEX key_packages_user_fifo;
ALTER TABLE key_packages DROP COLUMN id;
-- The primary key is the FIFO index.
ALTER TABLE key_packages ADD PRIMARY KEY (user_id, seq);
CREATE INDEX key_packages_unread ON key_packages (user_id, seq) WHERE cipher_suite IS NULL;

-- Locks the budget row (scope, subject), creating it on first use, and judges one more
-- request by GCRA at the database's clock read after the lock (or p_now_us), charging nothing:
-- the tat to store if the claim goes ahead, and the wait (0 when it may). A stored tat ahead of
-- now + window (a clock that ran ahead) is cut back to now + window at once, so it locks the
-- bucket for one refill interval at most.
CREATE FUNCTION kps_budget(p_scope smallint, p_subject text, p_interval_us bigint,
                           p_window_us bigint, p_now_us bigint,
                           OUT wait_us bigint, OUT next_tat_us bigint)
LANGUAGE plpgsql SET enable_seqscan = off SET plan_cache_mode = force_generic_plan AS $$
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
-- 3. Share-lock the target's user row (an upload or delete in flight finishes first), then in
--    one statement remove its expired regular packages, hand out the oldest unexpired one of
--    p_suites (NULL: any), or else count a hand-out of its last-resort package if that has not
--    expired and qualifies.
-- 4. With a key and a package handed out: record it for p_ttl_us; otherwise drop the key.
--
-- Returns one row; `outcome` is package, replayed, reused, empty, incompatible, or the refusing
-- stage (caller, pair, target) with wait_us.
CREATE FUNCTION kps_claim(p_target text, p_caller text, p_key text, p_ttl_us bigint,
                          p_now_us bigint, p_suites integer[],
                          p_target_interval bigint, p_target_window bigint,
                          p_caller_interval bigint, p_caller_window bigint,
                          p_pair_interval bigint, p_pair_window bigint)
RETURNS TABLE (outcome text, wait_us bigint, expired_removed bigint, kp_data bytea,
               kp_fingerprint text, kp_is_last_resort boolean, kp_cipher_suite integer,
               kp_not_after bytea, kp_ref bytea)
LANGUAGE plpgsql SET enable_seqscan = off SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_now bigint;
    v_judged record;
    v_caller_tat bigint;
    v_pair_tat bigint;
    v_target_tat bigint;
    v_now_key bytea;
    v_replay claim_replays%ROWTYPE;
BEGIN
    expired_removed := 0;
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
                    outcome := 'reused';
                    RETURN NEXT;
                    RETURN;
                END IF;
                outcome := 'replayed';
                kp_data := v_replay.data;
                kp_fingerprint := v_replay.fingerprint;
                kp_is_last_resort := v_replay.is_last_resort;
                kp_cipher_suite := v_replay.cipher_suite;
                kp_not_after := v_replay.not_after;
                kp_ref := v_replay.key_package_ref;
                RETURN NEXT;
                RETURN;
            END IF;
            -- Expired: the key is free again, and now held by this claim.
            UPDATE claim_replays r SET target = p_target, expires_us = v_now + p_ttl_us
            WHERE r.caller = p_caller AND r.idem_key = p_key;
        END IF;
    END IF;

    -- Every stage is judged before any is charged: a refused claim charges none of them.
    IF p_caller_interval IS NOT NULL THEN
        v_judged := kps_budget(1::smallint, p_caller, p_caller_interval, p_caller_window,
                               p_now_us);
        IF v_judged.wait_us > 0 THEN
            outcome := 'caller';
        END IF;
        v_caller_tat := v_judged.next_tat_us;
    END IF;
    IF outcome IS NULL AND p_pair_interval IS NOT NULL THEN
        v_judged := kps_budget(2::smallint, p_caller || ' ' || p_target, p_pair_interval,
                               p_pair_window, p_now_us);
        IF v_judged.wait_us > 0 THEN
            outcome := 'pair';
        END IF;
        v_pair_tat := v_judged.next_tat_us;
    END IF;
    IF outcome IS NULL THEN
        v_judged := kps_budget(0::smallint, p_target, p_target_interval, p_target_window,
                               p_now_us);
        IF v_judged.wait_us > 0 THEN
            outcome := 'target';
        END IF;
        v_target_tat := v_judged.next_tat_us;
    END IF;
    IF outcome IS NOT NULL THEN
        IF p_key IS NOT NULL THEN
            DELETE FROM claim_replays r WHERE r.caller = p_caller AND r.idem_key = p_key;
        END IF;
        wait_us := v_judged.wait_us;
        RETURN NEXT;
        RETURN;
    END IF;
    IF v_caller_tat IS NULL AND v_pair_tat IS NULL THEN
        UPDATE consume_budgets b SET tat_us = v_target_tat
        WHERE b.scope = 0 AND b.subject = p_target;
    ELSE
        UPDATE consume_budgets b SET tat_us = c.tat
        FROM (VALUES (1::smallint, p_caller, v_caller_tat),
                     (2::smallint, p_caller || ' ' || p_target, v_pair_tat),
                     (0::smallint, p_target, v_target_tat)) AS c (scope, subject, tat)
        WHERE c.tat IS NOT NULL AND b.scope = c.scope AND b.subject = c.subject;
    END IF;

    PERFORM 1 FROM users u WHERE u.user_id = p_target FOR SHARE;
    v_now := COALESCE(p_now_us, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
    -- Unix seconds as 8 big-endian bytes, comparable with not_after (see 0003).
    v_now_key := int8send(GREATEST(v_now, 0) / 1000000);
    -- One DELETE sweeps the expired packages and takes the pick (which skips them); the
    -- sweep finds them by key_packages_user_expiry, the pick by the primary key.
    WITH taken AS (
        DELETE FROM key_packages k
        WHERE (k.user_id = p_target AND k.not_after <= v_now_key)
           OR (k.user_id = p_target AND k.seq = (SELECT p.seq FROM key_packages p
                      WHERE p.user_id = p_target
                        AND (p.not_after IS NULL OR p.not_after > v_now_key)
                        AND (p_suites IS NULL OR p.cipher_suite = ANY (p_suites))
                      ORDER BY p.seq LIMIT 1))
        RETURNING k.data, k.fingerprint, false AS is_last_resort, k.cipher_suite, k.not_after,
                  k.key_package_ref
    ), regular AS (
        SELECT * FROM taken t WHERE t.not_after IS NULL OR t.not_after > v_now_key
    ), last_resort AS (
        UPDATE users u SET last_resort_handouts = u.last_resort_handouts + 1
        WHERE u.user_id = p_target AND u.last_resort IS NOT NULL
          AND (u.last_resort_not_after IS NULL OR u.last_resort_not_after > v_now_key)
          AND (p_suites IS NULL OR u.last_resort_cipher_suite = ANY (p_suites))
          AND NOT EXISTS (SELECT FROM regular)
        RETURNING u.last_resort, u.last_resort_fingerprint, true, u.last_resort_cipher_suite,
                  u.last_resort_not_after, u.last_resort_ref
    ), handed AS (
        SELECT * FROM regular UNION ALL SELECT * FROM last_resort
    )
    SELECT (SELECT count(*) FROM taken t WHERE t.not_after <= v_now_key), h.*
    FROM (SELECT) AS one LEFT JOIN handed h ON true
    INTO expired_removed, kp_data, kp_fingerprint, kp_is_last_resort, kp_cipher_suite,
         kp_not_after, kp_ref;
    IF kp_data IS NULL THEN
        IF p_key IS NOT NULL THEN
            DELETE FROM claim_replays r WHERE r.caller = p_caller AND r.idem_key = p_key;
        END IF;
        outcome := CASE
            WHEN EXISTS (SELECT FROM key_packages p WHERE p.user_id = p_target)
              OR EXISTS (SELECT FROM users u WHERE u.user_id = p_target
                         AND u.last_resort IS NOT NULL
                         AND (u.last_resort_not_after IS NULL
                              OR u.last_resort_not_after > v_now_key))
            THEN 'incompatible' ELSE 'empty' END;
        RETURN NEXT;
        RETURN;
    END IF;
    IF p_key IS NOT NULL THEN
        UPDATE claim_replays r
        SET data = kp_data, fingerprint = kp_fingerprint, is_last_resort = kp_is_last_resort,
            cipher_suite = kp_cipher_suite, not_after = kp_not_after, key_package_ref = kp_ref
        WHERE r.caller = p_caller AND r.idem_key = p_key;
    END IF;
    outcome := 'package';
    RETURN NEXT;
END
$$;
