-- Uploads in one round trip (kps_upload), and several users' uploads in one statement
-- (kps_upload_batch).
--
-- An upload in one round trip. Until now the server sent an upload's statements one by one in
-- a transaction (BEGIN, lock the user's row, sweep, write, status, COMMIT): six round trips,
-- each a wake-up of the database backend, where a claim needs one. kps_upload runs the same
-- statements, in the same order and under the same locks, inside the database.
--
-- Lock order: the user's row first (created, or locked for update), then the user's packages,
-- as before; claims and deletes take them in that order too.
--
-- The plan (which packages an upload stores) is the server's UploadPlan, restated here: a
-- package whose digest the user holds already (regular or last resort, after the sweep) is
-- skipped; of the new regular packages the p_max_regular newest are kept; the held regular
-- packages are trimmed to the newest p_max_regular minus those, then the new ones are
-- appended in upload order, numbered from the positions reserved on the user's row.
--
-- p_user; p_fingerprint or NULL, p_fingerprint_at (Unix seconds, NULL when p_fingerprint is
-- NULL); p_now_key (now as a not_after key); the regular packages' digests, bytes, suites,
-- not_after keys and refs (oldest first), with p_floor the earliest of their not_after keys
-- (NULL if none has one); the last-resort package's bytes, digest, suite, not_after key and
-- ref (NULLs for none); p_max_regular, the most regular packages a user holds.
--
-- One row per servable regular package held afterwards, oldest first (one row with NULL
-- package columns when none is), each carrying how many packages were stored, how many
-- expired ones the sweep removed, and the status columns of the user's row.
CREATE FUNCTION kps_upload(p_user text, p_fingerprint text, p_fingerprint_at bigint,
                           p_now_key bytea, p_digests bytea[], p_data bytea[],
                           p_suites integer[], p_not_after bytea[], p_refs bytea[],
                           p_floor bytea, p_lr_data bytea, p_lr_digest bytea,
                           p_lr_suite integer, p_lr_not_after bytea, p_lr_ref bytea,
                           p_max_regular integer)
RETURNS TABLE (stored bigint, expired bigint, u_fingerprint text, u_last_resort_handouts bigint,
               u_last_resort_digest bytea, u_last_resort_not_after bytea, k_digest bytea,
               k_cipher_suite integer, k_not_after bytea)
LANGUAGE plpgsql SET enable_seqscan = off SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_n integer := COALESCE(cardinality(p_digests), 0);
    v_held_last_resort bytea;
    v_first bigint;
    v_expired bigint;
    v_held bytea[];
    v_plan integer[];
    v_last_resort boolean;
    v_inserted bigint := 0;
BEGIN
    INSERT INTO users AS u (user_id, fingerprint, fingerprint_updated_at, next_seq,
                            regular_expiry_floor)
    VALUES (p_user, p_fingerprint, p_fingerprint_at, 1 + v_n, p_floor)
    ON CONFLICT (user_id) DO UPDATE SET
        next_seq = u.next_seq + v_n,
        regular_expiry_floor = LEAST(u.regular_expiry_floor, EXCLUDED.regular_expiry_floor),
        fingerprint = COALESCE(EXCLUDED.fingerprint, u.fingerprint),
        fingerprint_updated_at = CASE
            WHEN EXCLUDED.fingerprint IS NOT NULL
             AND EXCLUDED.fingerprint IS DISTINCT FROM u.fingerprint
            THEN EXCLUDED.fingerprint_updated_at
            ELSE u.fingerprint_updated_at
        END
    RETURNING u.last_resort_digest, u.next_seq - v_n INTO v_held_last_resort, v_first;

    WITH swept AS (
        DELETE FROM key_packages k WHERE k.user_id = p_user AND k.not_after <= p_now_key
        RETURNING 1
    )
    SELECT count(*) INTO v_expired FROM swept;
    v_held := ARRAY(SELECT k.digest FROM key_packages k WHERE k.user_id = p_user);

    v_plan := ARRAY(
        SELECT n.ord FROM (
            SELECT p.ord FROM unnest(p_digests) WITH ORDINALITY AS p (digest, ord)
            WHERE NOT (p.digest = ANY (v_held))
              AND p.digest IS DISTINCT FROM v_held_last_resort
            ORDER BY p.ord DESC LIMIT p_max_regular
        ) AS n ORDER BY n.ord);
    v_last_resort := p_lr_data IS NOT NULL
        AND NOT (p_lr_digest = ANY (v_held))
        AND p_lr_digest IS DISTINCT FROM v_held_last_resort;

    IF cardinality(v_plan) > 0 OR v_last_resort THEN
        DELETE FROM key_packages k
        WHERE k.user_id = p_user
          AND k.seq IN (SELECT h.seq FROM key_packages h WHERE h.user_id = p_user
                        ORDER BY h.seq DESC OFFSET p_max_regular - cardinality(v_plan));
        INSERT INTO key_packages AS k
            (user_id, seq, digest, data, fingerprint, cipher_suite, not_after, key_package_ref)
        SELECT p_user, v_first + q.i - 1, p_digests[q.src], p_data[q.src],
               COALESCE(p_fingerprint, ''), p_suites[q.src], p_not_after[q.src], p_refs[q.src]
        FROM unnest(v_plan) WITH ORDINALITY AS q (src, i)
        ORDER BY q.i
        ON CONFLICT (user_id, digest) DO NOTHING;
        GET DIAGNOSTICS v_inserted = ROW_COUNT;
        IF v_last_resort THEN
            UPDATE users u
            SET last_resort = p_lr_data, last_resort_digest = p_lr_digest,
                last_resort_fingerprint = COALESCE(p_fingerprint, ''),
                last_resort_handouts = 0, last_resort_cipher_suite = p_lr_suite,
                last_resort_not_after = p_lr_not_after, last_resort_ref = p_lr_ref
            WHERE u.user_id = p_user;
        END IF;
    END IF;

    RETURN QUERY
    SELECT v_inserted + v_last_resort::integer, v_expired, u.fingerprint,
           u.last_resort_handouts, u.last_resort_digest, u.last_resort_not_after,
           k.digest, k.cipher_suite, k.not_after
    FROM users u
    LEFT JOIN key_packages k
        ON k.user_id = u.user_id AND (k.not_after IS NULL OR k.not_after > p_now_key)
    WHERE u.user_id = p_user
    ORDER BY k.seq;
END
$$;

-- Uploads of different users at once, the server's group commit for uploads (as
-- kps_claim_batch is for claims): one statement, one transaction, one WAL flush. Upload i's
-- arguments are the i-th element of each array (as kps_upload's), its regular packages the
-- slice p_first[i] .. p_first[i] + p_count[i] - 1 of the package arrays. The users are
-- pairwise distinct, so the batch stores exactly what its uploads would one after the other.
--
-- The uploads run in the order of their users. Every transaction that locks the rows of
-- several users (batches of claims too) takes them in that order, each user's row before its
-- packages, so none waits for another in a cycle.
--
-- kps_upload's rows for each upload, tagged with its index.
CREATE FUNCTION kps_upload_batch(p_users text[], p_fingerprints text[],
                                 p_fingerprint_ats bigint[], p_now_keys bytea[],
                                 p_first integer[], p_count integer[], p_digests bytea[],
                                 p_data bytea[], p_suites integer[], p_not_after bytea[],
                                 p_refs bytea[], p_floors bytea[], p_lr_data bytea[],
                                 p_lr_digests bytea[], p_lr_suites integer[],
                                 p_lr_not_after bytea[], p_lr_refs bytea[],
                                 p_max_regular integer)
RETURNS TABLE (upload integer, stored bigint, expired bigint, u_fingerprint text,
               u_last_resort_handouts bigint, u_last_resort_digest bytea,
               u_last_resort_not_after bytea, k_digest bytea, k_cipher_suite integer,
               k_not_after bytea)
LANGUAGE plpgsql AS $$
DECLARE
    v_i integer;
    v_from integer;
    v_to integer;
BEGIN
    FOR v_i IN SELECT o FROM generate_subscripts(p_users, 1) AS o ORDER BY p_users[o] LOOP
        v_from := p_first[v_i];
        v_to := p_first[v_i] + p_count[v_i] - 1;
        RETURN QUERY
        SELECT v_i, r.* FROM kps_upload(p_users[v_i], p_fingerprints[v_i],
                                        p_fingerprint_ats[v_i], p_now_keys[v_i],
                                        p_digests[v_from:v_to], p_data[v_from:v_to],
                                        p_suites[v_from:v_to], p_not_after[v_from:v_to],
                                        p_refs[v_from:v_to], p_floors[v_i], p_lr_data[v_i],
                                        p_lr_digests[v_i], p_lr_suites[v_i],
                                        p_lr_not_after[v_i], p_lr_refs[v_i],
                                        p_max_regular) AS r;
    END LOOP;
END
$$;
