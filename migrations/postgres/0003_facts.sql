-- v1.1: the facts the server reads from each package (see src/mls_codec.rs).
--
-- cipher_suite: the package's suite; 0 for an opaque package; NULL for a package stored by an
--   earlier version and not read yet (the start-up backfill reads those, in batches).
-- not_after:    lifetime.not_after as 8 big-endian bytes (bytea compares bytewise, so as the
--   u64 does, for every u64; a BIGINT cannot hold them all); NULL for an opaque package, which
--   never expires.
-- key_package_ref: the KeyPackageRef; NULL when opaque or the suite's hash is unknown.
ALTER TABLE key_packages
    ADD COLUMN cipher_suite    INTEGER,
    ADD COLUMN not_after       BYTEA,
    ADD COLUMN key_package_ref BYTEA;
ALTER TABLE users
    ADD COLUMN last_resort_cipher_suite INTEGER,
    ADD COLUMN last_resort_not_after    BYTEA,
    ADD COLUMN last_resort_ref          BYTEA;

-- What the backfill has left to read: small, and empty once it has run.
CREATE INDEX key_packages_unread ON key_packages (id) WHERE cipher_suite IS NULL;
CREATE INDEX users_last_resort_unread ON users (user_id)
    WHERE last_resort IS NOT NULL AND last_resort_cipher_suite IS NULL;

-- Consumption with facts. Steps 1–3 as before (see 0002); then:
-- 4. Remove the target's expired regular packages (`not_after` <= now).
-- 5. Hand out the oldest remaining regular package of one of p_suites (NULL: any package,
--    opaque ones included), removing it; else count a hand-out of the last-resort package if
--    it has not expired and is of one of p_suites.
-- The pick is a range scan of key_packages_user_fifo (user_id, id) over the target's rows,
-- which uploads keep at 10 at most.
--
-- Returns exactly one row: `wait_us` set when the budget refuses (nothing charged, nothing
-- removed); else the package, or no package with `servable` telling whether the target holds
-- anything that could be handed out to a claim without a suite filter.
DROP FUNCTION kps_consume(text, bigint, bigint, bigint);
CREATE FUNCTION kps_consume(p_target text, p_interval_us bigint, p_window_us bigint,
                            p_now_us bigint, p_suites integer[])
RETURNS TABLE (wait_us bigint, expired_removed bigint, servable boolean, kp_data bytea,
               kp_fingerprint text, kp_is_last_resort boolean, kp_cipher_suite integer,
               kp_not_after bytea, kp_ref bytea)
LANGUAGE plpgsql AS $$
DECLARE
    v_tat bigint;
    v_now bigint;
    v_now_key bytea;
    v_expired bigint;
BEGIN
    SELECT b.tat_us INTO v_tat FROM consume_budgets b WHERE b.user_id = p_target FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO consume_budgets (user_id, tat_us) VALUES (p_target, 0)
        ON CONFLICT (user_id) DO NOTHING;
        SELECT b.tat_us INTO v_tat FROM consume_budgets b WHERE b.user_id = p_target FOR UPDATE;
    END IF;
    PERFORM 1 FROM users u WHERE u.user_id = p_target FOR SHARE;

    v_now := COALESCE(p_now_us, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
    IF v_tat > v_now + p_window_us THEN
        -- Written by a clock that ran ahead: keep it as an empty bucket refilling from now.
        v_tat := v_now + p_window_us;
        UPDATE consume_budgets SET tat_us = v_tat WHERE user_id = p_target;
    END IF;
    v_tat := GREATEST(v_tat, v_now) + p_interval_us;
    IF v_tat > v_now + p_window_us THEN
        RETURN QUERY SELECT v_tat - (v_now + p_window_us), 0::bigint, NULL::boolean,
            NULL::bytea, NULL::text, NULL::boolean, NULL::integer, NULL::bytea, NULL::bytea;
        RETURN;
    END IF;
    UPDATE consume_budgets SET tat_us = v_tat WHERE user_id = p_target;

    -- Unix seconds as 8 big-endian bytes, comparable with not_after (see the columns above).
    v_now_key := int8send(GREATEST(v_now, 0) / 1000000);
    DELETE FROM key_packages k WHERE k.user_id = p_target AND k.not_after <= v_now_key;
    GET DIAGNOSTICS v_expired = ROW_COUNT;

    RETURN QUERY
    WITH regular AS (
        DELETE FROM key_packages k
        WHERE k.id = (SELECT p.id FROM key_packages p
                      WHERE p.user_id = p_target
                        AND (p_suites IS NULL OR p.cipher_suite = ANY (p_suites))
                      ORDER BY p.id LIMIT 1)
        RETURNING k.data, k.fingerprint, k.cipher_suite, k.not_after, k.key_package_ref
    ), last_resort AS (
        UPDATE users u SET last_resort_handouts = u.last_resort_handouts + 1
        WHERE u.user_id = p_target AND u.last_resort IS NOT NULL
          AND (u.last_resort_not_after IS NULL OR u.last_resort_not_after > v_now_key)
          AND (p_suites IS NULL OR u.last_resort_cipher_suite = ANY (p_suites))
          AND NOT EXISTS (SELECT FROM regular)
        RETURNING u.last_resort, u.last_resort_fingerprint, u.last_resort_cipher_suite,
                  u.last_resort_not_after, u.last_resort_ref
    )
    SELECT NULL::bigint, v_expired, true, r.data, r.fingerprint, false, r.cipher_suite,
           r.not_after, r.key_package_ref
    FROM regular r
    UNION ALL
    SELECT NULL::bigint, v_expired, true, l.last_resort, l.last_resort_fingerprint, true,
           l.last_resort_cipher_suite, l.last_resort_not_after, l.last_resort_ref
    FROM last_resort l;
    IF FOUND THEN
        RETURN;
    END IF;
    RETURN QUERY SELECT NULL::bigint, v_expired,
        EXISTS (SELECT FROM key_packages p WHERE p.user_id = p_target)
        OR EXISTS (SELECT FROM users u WHERE u.user_id = p_target AND u.last_resort IS NOT NULL
                   AND (u.last_resort_not_after IS NULL
                        OR u.last_resort_not_after > v_now_key)),
        NULL::bytea, NULL::text, NULL::boolean, NULL::integer, NULL::bytea, NULL::bytea;
END
$$;
