-- A claim sweeps the target's expired packages only when one may have expired. Each user row
-- keeps a floor of its regular packages' lifetimes: no package of the user has a not_after
-- below it (NULL: none has a not_after). Uploads lower it under the row lock they hold; a
-- claim reads it with the share lock it takes anyway, and only once it has passed does it run
-- the sweep and make the floor exact again. The floor may lag below the truth (a hand-out or
-- an upload's own sweep removes the earliest package): that costs one sweep that finds
-- nothing. Packages not read yet (stored before 0003, cipher_suite NULL until the backfill
-- reads them) may have any lifetime, so a user holding one keeps the lowest floor, and every
-- claim sweeps until they are read.
--
-- The common claim then picks its package by the primary key alone, as v1's did.
ALTER TABLE users ADD COLUMN regular_expiry_floor BYTEA;
UPDATE users u SET regular_expiry_floor = CASE
    WHEN EXISTS (SELECT FROM key_packages p WHERE p.user_id = u.user_id AND p.cipher_suite IS NULL)
    THEN '\x0000000000000000'::bytea
    ELSE (SELECT p.not_after FROM key_packages p
          WHERE p.user_id = u.user_id AND p.not_after IS NOT NULL
          ORDER BY p.not_after LIMIT 1) END
WHERE EXISTS (SELECT FROM key_packages p WHERE p.user_id = u.user_id);

-- kps_budget is only called inside kps_claim, whose settings apply to it: its own SET clauses
-- only cost a save and restore of the settings at every call.
ALTER FUNCTION kps_budget(smallint, text, bigint, bigint, bigint) RESET ALL;

-- As in 0005, but for step 3: share-lock the target's user row, reading its floor; if the
-- floor has passed, remove its expired regular packages and make the floor exact; then hand
-- out the oldest unexpired one of p_suites (NULL: any), or else count a hand-out of its
-- last-resort package if that has not expired and qualifies.
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
    v_now bigint;
    v_judged record;
    v_caller_tat bigint;
    v_pair_tat bigint;
    v_target_tat bigint;
    v_now_key bytea;
    v_floor bytea;
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
        SELECT count(*) INTO expired_removed FROM swept;
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
    INTO kp_data, kp_fingerprint, kp_is_last_resort, kp_cipher_suite, kp_not_after, kp_ref;
    IF kp_data IS NULL THEN
        IF p_key IS NOT NULL THEN
            DELETE FROM claim_replays r WHERE r.caller = p_caller AND r.idem_key = p_key;
        END IF;
        outcome := CASE
            WHEN EXISTS (SELECT FROM key_packages p WHERE p.user_id = p_target
                         AND (p.not_after IS NULL OR p.not_after > v_now_key))
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
