-- Group commit for claims: claims of different users that arrive together run in one
-- statement, sharing its round trip, its transaction and its WAL flush (kps_claim_batch).
--
-- A batch only holds claims with pairwise distinct targets and pairwise distinct callers, so
-- distinct pairs and idempotency records too: no claim of a batch reads or writes a row that
-- another one of it does, and the batch hands out exactly what its claims would one after the
-- other, FIFO, exactly once and within every budget.
--
-- Lock order. A lone claim locks at most one row of each kind, in this order: its idempotency
-- record, the caller's budget, the pair's budget, the target's budget, then the target's user
-- row and its packages. A batch takes the same kinds in the same order, every row of one kind
-- before any row of the next, each kind sorted by its key. Uploads and deletes lock one user
-- row and then its packages. So no two of them ever wait for each other in a cycle.
--
-- kps_claim keeps its signature; its steps 1 and 3 move into functions of their own, which
-- kps_claim_batch calls too.

CREATE TYPE kps_claimed AS (outcome text, wait_us bigint, expired_removed bigint, kp_data bytea,
                            kp_fingerprint text, kp_is_last_resort boolean,
                            kp_cipher_suite integer, kp_not_after bytea, kp_ref bytea);

-- Step 1 of a claim with a key (see 0005): takes the caller's key. A committed, unexpired
-- record answers (the same target: replayed; another: reused); otherwise the key is this
-- claim's, and the outcome is NULL.
CREATE FUNCTION kps_claim_key(p_target text, p_caller text, p_key text, p_ttl_us bigint,
                              p_now_us bigint)
RETURNS kps_claimed
LANGUAGE plpgsql AS $$
DECLARE
    v_now bigint;
    v_replay claim_replays%ROWTYPE;
    v kps_claimed;
BEGIN
    v_now := COALESCE(p_now_us, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
    INSERT INTO claim_replays AS r (caller, idem_key, target, expires_us, data, fingerprint,
                                    is_last_resort)
    VALUES (p_caller, p_key, p_target, v_now + p_ttl_us, ''::bytea, '', false)
    ON CONFLICT (caller, idem_key) DO NOTHING;
    IF FOUND THEN
        RETURN v;
    END IF;
    SELECT * INTO v_replay FROM claim_replays r
    WHERE r.caller = p_caller AND r.idem_key = p_key FOR UPDATE;
    IF v_replay.expires_us > v_now THEN
        v.expired_removed := 0;
        IF v_replay.target <> p_target THEN
            v.outcome := 'reused';
            RETURN v;
        END IF;
        v.outcome := 'replayed';
        v.kp_data := v_replay.data;
        v.kp_fingerprint := v_replay.fingerprint;
        v.kp_is_last_resort := v_replay.is_last_resort;
        v.kp_cipher_suite := v_replay.cipher_suite;
        v.kp_not_after := v_replay.not_after;
        v.kp_ref := v_replay.key_package_ref;
        RETURN v;
    END IF;
    -- Expired: the key is free again, and now held by this claim.
    UPDATE claim_replays r SET target = p_target, expires_us = v_now + p_ttl_us
    WHERE r.caller = p_caller AND r.idem_key = p_key;
    RETURN v;
END
$$;

-- Charges the stages a claim passed (a NULL tat: the stage is off).
CREATE FUNCTION kps_charge(p_target text, p_caller text, p_caller_tat bigint,
                           p_pair_tat bigint, p_target_tat bigint)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_caller_tat IS NULL AND p_pair_tat IS NULL THEN
        UPDATE consume_budgets b SET tat_us = p_target_tat
        WHERE b.scope = 0 AND b.subject = p_target;
    ELSE
        UPDATE consume_budgets b SET tat_us = c.tat
        FROM (VALUES (1::smallint, p_caller, p_caller_tat),
                     (2::smallint, p_caller || ' ' || p_target, p_pair_tat),
                     (0::smallint, p_target, p_target_tat)) AS c (scope, subject, tat)
        WHERE c.tat IS NOT NULL AND b.scope = c.scope AND b.subject = c.subject;
    END IF;
END
$$;

-- Steps 3 and 4 of a claim whose budgets passed and were charged (see 0006): share-lock the
-- target's user row, reading its floor; if the floor has passed, remove its expired regular
-- packages and make the floor exact; hand out the oldest unexpired one of p_suites (NULL:
-- any), or else count a hand-out of its last-resort package if that has not expired and
-- qualifies; with a key, record the package handed out, or drop the key.
CREATE FUNCTION kps_take(p_target text, p_caller text, p_key text, p_now_us bigint,
                         p_suites integer[])
RETURNS kps_claimed
LANGUAGE plpgsql AS $$
DECLARE
    v kps_claimed;
    v_now bigint;
    v_now_key bytea;
    v_floor bytea;
BEGIN
    v.expired_removed := 0;
    SELECT u.regular_expiry_floor INTO v_floor FROM users u WHERE u.user_id = p_target
    FOR SHARE;
    v_now := COALESCE(p_now_us, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
    -- Unix seconds as 8 big-endian bytes, comparable with not_after (see 0003).
    v_now_key := int8send(GREATEST(v_now, 0) / 1000000);
    IF v_floor <= v_now_key THEN
        WITH swept AS (
            DELETE FROM key_packages k WHERE k.user_id = p_target AND k.not_after <= v_now_key
            RETURNING 1
        )
        SELECT count(*) INTO v.expired_removed FROM swept;
        UPDATE users u SET regular_expiry_floor = CASE
            WHEN EXISTS (SELECT FROM key_packages p
                         WHERE p.user_id = p_target AND p.cipher_suite IS NULL)
            THEN '\x0000000000000000'::bytea
            ELSE (SELECT p.not_after FROM key_packages p
                  WHERE p.user_id = p_target AND p.not_after IS NOT NULL
                  ORDER BY p.not_after LIMIT 1) END
        WHERE u.user_id = p_target;
    END IF;
    WITH regular AS (
        DELETE FROM key_packages k
        WHERE k.user_id = p_target
          AND k.seq = (SELECT p.seq FROM key_packages p
                       WHERE p.user_id = p_target
                         AND (p.not_after IS NULL OR p.not_after > v_now_key)
                         AND (p_suites IS NULL OR p.cipher_suite = ANY (p_suites))
                       ORDER BY p.seq LIMIT 1)
        RETURNING k.data, k.fingerprint, false AS is_last_resort, k.cipher_suite, k.not_after,
                  k.key_package_ref
    ), last_resort AS (
        UPDATE users u SET last_resort_handouts = u.last_resort_handouts + 1
        WHERE u.user_id = p_target AND u.last_resort IS NOT NULL
          AND (u.last_resort_not_after IS NULL OR u.last_resort_not_after > v_now_key)
          AND (p_suites IS NULL OR u.last_resort_cipher_suite = ANY (p_suites))
          AND NOT EXISTS (SELECT FROM regular)
        RETURNING u.last_resort, u.last_resort_fingerprint, true, u.last_resort_cipher_suite,
                  u.last_resort_not_after, u.last_resort_ref
    )
    SELECT * FROM regular UNION ALL SELECT * FROM last_resort
    INTO v.kp_data, v.kp_fingerprint, v.kp_is_last_resort, v.kp_cipher_suite, v.kp_not_after,
         v.kp_ref;
    IF v.kp_data IS NULL THEN
        IF p_key IS NOT NULL THEN
            DELETE FROM claim_replays r WHERE r.caller = p_caller AND r.idem_key = p_key;
        END IF;
        v.outcome := CASE
            WHEN EXISTS (SELECT FROM key_packages p WHERE p.user_id = p_target
                         AND (p.not_after IS NULL OR p.not_after > v_now_key))
              OR EXISTS (SELECT FROM users u WHERE u.user_id = p_target
                         AND u.last_resort IS NOT NULL
                         AND (u.last_resort_not_after IS NULL
                              OR u.last_resort_not_after > v_now_key))
            THEN 'incompatible' ELSE 'empty' END;
        RETURN v;
    END IF;
    IF p_key IS NOT NULL THEN
        UPDATE claim_replays r
        SET data = v.kp_data, fingerprint = v.kp_fingerprint,
            is_last_resort = v.kp_is_last_resort, cipher_suite = v.kp_cipher_suite,
            not_after = v.kp_not_after, key_package_ref = v.kp_ref
        WHERE r.caller = p_caller AND r.idem_key = p_key;
    END IF;
    v.outcome := 'package';
    RETURN v;
END
$$;

-- The settings of the calling claim function apply to the helpers (see 0006 for kps_budget).
CREATE OR REPLACE FUNCTION kps_claim(p_target text, p_caller text, p_key text, p_ttl_us bigint,
                                     p_now_us bigint, p_suites integer[],
                                     p_target_interval bigint, p_target_window bigint,
                                     p_caller_interval bigint, p_caller_window bigint,
                                     p_pair_interval bigint, p_pair_window bigint)
RETURNS TABLE (outcome text, wait_us bigint, expired_removed bigint, kp_data bytea,
               kp_fingerprint text, kp_is_last_resort boolean, kp_cipher_suite integer,
               kp_not_after bytea, kp_ref bytea)
LANGUAGE plpgsql SET enable_seqscan = off SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v kps_claimed;
    v_judged record;
    v_caller_tat bigint;
    v_pair_tat bigint;
    v_target_tat bigint;
BEGIN
    IF p_key IS NOT NULL THEN
        v := kps_claim_key(p_target, p_caller, p_key, p_ttl_us, p_now_us);
        IF v.outcome IS NOT NULL THEN
            RETURN QUERY SELECT (v).*;
            RETURN;
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
        expired_removed := 0;
        RETURN NEXT;
        RETURN;
    END IF;
    PERFORM kps_charge(p_target, p_caller, v_caller_tat, v_pair_tat, v_target_tat);
    v := kps_take(p_target, p_caller, p_key, p_now_us, p_suites);
    RETURN QUERY SELECT (v).*;
END
$$;

-- Claims i = 1..n, given as arrays that hold claim i at index i (the arguments of kps_claim;
-- p_suites[i] a '{...}' literal of the accepted suites, NULL for any), with pairwise distinct
-- targets and pairwise distinct callers (NULL callers aside). One row per claim: its index in
-- `claim`, then what kps_claim would return for it. Each kind of row is locked for every claim
-- before the next kind, sorted by its key (see the top of this file).
CREATE FUNCTION kps_claim_batch(p_targets text[], p_callers text[], p_keys text[],
                                p_ttls_us bigint[], p_nows_us bigint[], p_suites text[],
                                p_target_intervals bigint[], p_target_windows bigint[],
                                p_caller_intervals bigint[], p_caller_windows bigint[],
                                p_pair_intervals bigint[], p_pair_windows bigint[])
RETURNS TABLE (claim integer, outcome text, wait_us bigint, expired_removed bigint,
               kp_data bytea, kp_fingerprint text, kp_is_last_resort boolean,
               kp_cipher_suite integer, kp_not_after bytea, kp_ref bytea)
LANGUAGE plpgsql SET enable_seqscan = off SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_n integer := cardinality(p_targets);
    v_rows kps_claimed[] := array_fill(NULL::kps_claimed, ARRAY[v_n]);
    v_outcome text[] := array_fill(NULL::text, ARRAY[v_n]);
    v_wait bigint[] := array_fill(NULL::bigint, ARRAY[v_n]);
    v_caller_tat bigint[] := array_fill(NULL::bigint, ARRAY[v_n]);
    v_pair_tat bigint[] := array_fill(NULL::bigint, ARRAY[v_n]);
    v_target_tat bigint[] := array_fill(NULL::bigint, ARRAY[v_n]);
    v_i integer;
    v kps_claimed;
    v_judged record;
BEGIN
    -- 1. The idempotency records, by caller and key.
    FOR v_i IN SELECT o FROM generate_subscripts(p_targets, 1) AS o
               WHERE p_keys[o] IS NOT NULL ORDER BY p_callers[o], p_keys[o] LOOP
        v := kps_claim_key(p_targets[v_i], p_callers[v_i], p_keys[v_i], p_ttls_us[v_i],
                           p_nows_us[v_i]);
        IF v.outcome IS NOT NULL THEN
            v_rows[v_i] := v;
            v_outcome[v_i] := v.outcome;
        END IF;
    END LOOP;
    -- 2. The callers' budgets, by caller; then 3. the pairs', by pair; then 4. the targets',
    -- by target. A claim refused at one stage is judged at none after it.
    FOR v_i IN SELECT o FROM generate_subscripts(p_targets, 1) AS o
               WHERE v_outcome[o] IS NULL AND p_caller_intervals[o] IS NOT NULL
               ORDER BY p_callers[o] LOOP
        v_judged := kps_budget(1::smallint, p_callers[v_i], p_caller_intervals[v_i],
                               p_caller_windows[v_i], p_nows_us[v_i]);
        IF v_judged.wait_us > 0 THEN
            v_outcome[v_i] := 'caller';
            v_wait[v_i] := v_judged.wait_us;
        END IF;
        v_caller_tat[v_i] := v_judged.next_tat_us;
    END LOOP;
    FOR v_i IN SELECT o FROM generate_subscripts(p_targets, 1) AS o
               WHERE v_outcome[o] IS NULL AND p_pair_intervals[o] IS NOT NULL
               ORDER BY p_callers[o] || ' ' || p_targets[o] LOOP
        v_judged := kps_budget(2::smallint, p_callers[v_i] || ' ' || p_targets[v_i],
                               p_pair_intervals[v_i], p_pair_windows[v_i], p_nows_us[v_i]);
        IF v_judged.wait_us > 0 THEN
            v_outcome[v_i] := 'pair';
            v_wait[v_i] := v_judged.wait_us;
        END IF;
        v_pair_tat[v_i] := v_judged.next_tat_us;
    END LOOP;
    FOR v_i IN SELECT o FROM generate_subscripts(p_targets, 1) AS o
               WHERE v_outcome[o] IS NULL ORDER BY p_targets[o] LOOP
        v_judged := kps_budget(0::smallint, p_targets[v_i], p_target_intervals[v_i],
                               p_target_windows[v_i], p_nows_us[v_i]);
        IF v_judged.wait_us > 0 THEN
            v_outcome[v_i] := 'target';
            v_wait[v_i] := v_judged.wait_us;
        END IF;
        v_target_tat[v_i] := v_judged.next_tat_us;
    END LOOP;
    -- 5. Refused claims drop their keys and charge nothing; the others charge every stage
    -- they passed, on rows they already hold.
    FOR v_i IN 1..v_n LOOP
        IF v_outcome[v_i] IN ('caller', 'pair', 'target') THEN
            IF p_keys[v_i] IS NOT NULL THEN
                DELETE FROM claim_replays r
                WHERE r.caller = p_callers[v_i] AND r.idem_key = p_keys[v_i];
            END IF;
            v := NULL;
            v.outcome := v_outcome[v_i];
            v.wait_us := v_wait[v_i];
            v.expired_removed := 0;
            v_rows[v_i] := v;
        ELSIF v_outcome[v_i] IS NULL THEN
            PERFORM kps_charge(p_targets[v_i], p_callers[v_i], v_caller_tat[v_i],
                               v_pair_tat[v_i], v_target_tat[v_i]);
        END IF;
    END LOOP;
    -- 6. The hand-outs, by target.
    FOR v_i IN SELECT o FROM generate_subscripts(p_targets, 1) AS o
               WHERE v_outcome[o] IS NULL ORDER BY p_targets[o] LOOP
        v_rows[v_i] := kps_take(p_targets[v_i], p_callers[v_i], p_keys[v_i], p_nows_us[v_i],
                                p_suites[v_i]::integer[]);
    END LOOP;
    RETURN QUERY SELECT o, (v_rows[o]).* FROM generate_subscripts(p_targets, 1) AS o;
END
$$;
