-- The hand-out deletes the package it picked by its row address (ctid) instead of looking it
-- up again by (user_id, seq): one descent of the largest index fewer per claim, the one that
-- grows with the number of packages stored. The address is stable for the statement: the
-- pick and the delete are one statement, the claim holds the target's budget row (claims of one
-- target run one at a time) and share-locks its user row (uploads and deletes, which take it
-- exclusively, wait), so nothing else moves or removes the row meanwhile. `user_id = p_target`
-- stays, so a partitioned table is still pruned to the target's partition.
--
-- kps_take otherwise as in 0007: share-lock the target's user row, reading its floor; if the
-- floor has passed, remove its expired regular packages and make the floor exact; hand out the
-- oldest unexpired one of p_suites (NULL: any), or else count a hand-out of its last-resort
-- package if that has not expired and qualifies; with a key, record the package handed out, or
-- drop the key.
CREATE OR REPLACE FUNCTION kps_take(p_target text, p_caller text, p_key text, p_now_us bigint,
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
          AND k.ctid = (SELECT p.ctid FROM key_packages p
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
