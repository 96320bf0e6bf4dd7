-- The consumption budget keeps microseconds (a refill interval of 1.5 ms must not round to 1 ms).
UPDATE consume_budgets SET tat = tat * 1000;
ALTER TABLE consume_budgets RENAME COLUMN tat TO tat_us;

-- One consumption, atomically and in one round trip. Each statement of a PL/pgSQL function
-- takes a fresh snapshot, so the pick below sees everything committed before the locks were
-- granted (a single statement would keep the snapshot it took before waiting for them).
--
-- 1. Lock the target's budget row (creating it on first use): one target's consumptions run
--    one after another, across every process on the database.
-- 2. Share-lock the target's user row: an upload or delete of that user in flight finishes
--    first, so the pick sees its packages and no trim is half-done under it.
-- 3. Charge the GCRA budget against the database's clock, read after the locks (hosts' clocks
--    may disagree; the database's is the one all processes share) unless the caller passes
--    p_now_us (tests). A stored tat is clamped to at most now + window, so a row written by a
--    clock that ran ahead locks a target out for at most one refill interval.
-- 4. Hand out the oldest regular package, removing it, or else count a last-resort hand-out.
--
-- Returns no row when nothing is held; a row with wait_us set when the budget refuses (then
-- nothing is charged); otherwise the package.
CREATE FUNCTION kps_consume(p_target text, p_interval_us bigint, p_window_us bigint,
                            p_now_us bigint)
RETURNS TABLE (wait_us bigint, data bytea, fingerprint text, is_last_resort boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_tat bigint;
    v_now bigint;
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
        RETURN QUERY SELECT v_tat - (v_now + p_window_us), NULL::bytea, NULL::text, NULL::boolean;
        RETURN;
    END IF;
    UPDATE consume_budgets SET tat_us = v_tat WHERE user_id = p_target;

    RETURN QUERY
    WITH regular AS (
        DELETE FROM key_packages k
        WHERE k.id = (SELECT p.id FROM key_packages p WHERE p.user_id = p_target
                      ORDER BY p.id LIMIT 1)
        RETURNING k.data, k.fingerprint
    ), last_resort AS (
        UPDATE users u SET last_resort_handouts = u.last_resort_handouts + 1
        WHERE u.user_id = p_target AND u.last_resort IS NOT NULL
          AND NOT EXISTS (SELECT FROM regular)
        RETURNING u.last_resort, u.last_resort_fingerprint
    )
    SELECT NULL::bigint, r.data, r.fingerprint, false FROM regular r
    UNION ALL
    SELECT NULL::bigint, l.last_resort, l.last_resort_fingerprint, true FROM last_resort l;
END
$$;
