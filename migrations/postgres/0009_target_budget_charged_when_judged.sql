-- The target's budget is charged as it is judged. The target is the last stage a claim is
-- judged at (kps_claim, kps_claim_batch), so a claim that passes it passes every stage and goes
-- ahead: nothing can refuse it after that point, and charging there is what kps_charge did later
-- on the same locked row. Neither function's body changes; kps_budget charges scope 0 itself
-- and kps_charge charges only the caller's and the pair's stages.
--
-- What it saves is the common case. A budget row is pruned once it has refilled, so most
-- claims of a target are its first in a refill window and find no row. They used to run four
-- statements on consume_budgets (the lookup that missed, the insert of an empty row, the lookup
-- again, the charge, which as a non-HOT update wrote a second row version and index entries)
-- and now run two (the lookup, and an insert of the charged row). A claim that finds its row
-- runs two, as before: the lookup and the charge.
--
-- Semantics are unchanged: the row is still locked at the target's stage, in the same lock
-- order; the clock is read after the lock (for an insert that won, nobody held the key); a
-- refused claim charges nothing; a stored tat ahead of now + window is still cut back at once.

-- Locks the budget row (scope, subject), creating it on first use, and judges one more
-- request by GCRA at the database's clock read after the lock (or p_now_us): the tat after the
-- request and the wait (0 when it may go ahead). The caller's and the pair's stages (scopes 1
-- and 2) charge nothing here (kps_charge does, once every stage passed); the target's stage
-- (scope 0) stores the new tat when it passes. A stored tat ahead of now + window (a clock that
-- ran ahead) is cut back to now + window at once, so it locks the bucket for one refill
-- interval at most.
CREATE OR REPLACE FUNCTION kps_budget(p_scope smallint, p_subject text, p_interval_us bigint,
                                      p_window_us bigint, p_now_us bigint,
                                      OUT wait_us bigint, OUT next_tat_us bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_tat bigint;
    v_now bigint;
    v_stored bigint;
BEGIN
    SELECT b.tat_us INTO v_tat FROM consume_budgets b
    WHERE b.scope = p_scope AND b.subject = p_subject FOR UPDATE;
    IF NOT FOUND THEN
        -- A fresh bucket (tat 0). Another claim inserting the same row first makes this insert
        -- do nothing; the lookup below then waits for it and judges what it left.
        v_now := COALESCE(p_now_us, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
        next_tat_us := GREATEST(0, v_now) + p_interval_us;
        wait_us := GREATEST(next_tat_us - (v_now + p_window_us), 0);
        INSERT INTO consume_budgets (scope, subject, tat_us)
        VALUES (p_scope, p_subject,
                CASE WHEN p_scope = 0 AND wait_us = 0 THEN next_tat_us ELSE 0 END)
        ON CONFLICT (scope, subject) DO NOTHING;
        IF FOUND THEN
            RETURN;
        END IF;
        SELECT b.tat_us INTO v_tat FROM consume_budgets b
        WHERE b.scope = p_scope AND b.subject = p_subject FOR UPDATE;
    END IF;
    v_now := COALESCE(p_now_us, (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
    v_stored := v_tat;
    IF v_tat > v_now + p_window_us THEN
        v_tat := v_now + p_window_us;
    END IF;
    next_tat_us := GREATEST(v_tat, v_now) + p_interval_us;
    wait_us := GREATEST(next_tat_us - (v_now + p_window_us), 0);
    IF p_scope = 0 AND wait_us = 0 THEN
        v_tat := next_tat_us;
    END IF;
    IF v_tat <> v_stored THEN
        UPDATE consume_budgets SET tat_us = v_tat WHERE scope = p_scope AND subject = p_subject;
    END IF;
END
$$;

-- Charges the caller's and the pair's stages a claim passed (a NULL tat: the stage is off);
-- the target's stage was charged as it passed (kps_budget), so p_target_tat is not used.
CREATE OR REPLACE FUNCTION kps_charge(p_target text, p_caller text, p_caller_tat bigint,
                                      p_pair_tat bigint, p_target_tat bigint)
RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF p_caller_tat IS NULL AND p_pair_tat IS NULL THEN
        RETURN;
    END IF;
    UPDATE consume_budgets b SET tat_us = c.tat
    FROM (VALUES (1::smallint, p_caller, p_caller_tat),
                 (2::smallint, p_caller || ' ' || p_target, p_pair_tat)) AS c (scope, subject, tat)
    WHERE c.tat IS NOT NULL AND b.scope = c.scope AND b.subject = c.subject;
END
$$;
