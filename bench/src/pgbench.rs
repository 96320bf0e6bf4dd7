//! pgbench scripts carrying exactly the SQL the Postgres store issues: the statements are the
//! store's own constants (`keypackage_server::store::postgres`), so the ceiling cannot drift
//! from the server; only their `$n` parameters are replaced by pgbench variables.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context, Result};
use keypackage_server::store::postgres::{CONSUME, UPLOAD};

/// Replaces `$1`, `$2`, … by the given expressions (highest numbers first, so `$1` never
/// eats the start of `$10`).
fn bind(sql: &str, params: &[&str]) -> String {
    let mut sql = sql.to_owned();
    for (i, expr) in params.iter().enumerate().rev() {
        sql = sql.replace(&format!("${}", i + 1), &format!("({expr})"));
    }
    sql
}

/// pgbench wants each statement on one line (or ending in `;`): keep the text, end with `;`.
fn statement(sql: &str) -> String {
    format!("{};\n", sql.trim().trim_end_matches(';'))
}

/// Writes `consume.sql`, `upload.sql` and `mixed.sql` into `out`, uploading packages of `size`
/// bytes. pgbench variables: `users`, `writers`, `callers`, and the refill interval and window
/// (µs) of the target's (`interval`, `window`), the caller's (`caller_interval`,
/// `caller_window`) and the pair's (`pair_interval`, `pair_window`) budgets, 0 for off.
pub(crate) fn write_scripts(out: &Path, size: usize) -> Result<()> {
    let now_s = "extract(epoch FROM now())::bigint";
    // Now as a `not_after` key (8 big-endian bytes), as the store binds it.
    let now_key = format!("int8send({now_s})");
    let fingerprint = "encode(sha256(convert_to('fingerprint:' || :u, 'UTF8')), 'hex')";
    let user = "'u' || :u";
    // A fresh package per transaction: the MLS header, a unique label, constant filler.
    let size = size.clamp(64, 16 * 1024);
    let filler = format!("'\\x{}'::bytea", "a5".repeat(size));
    let data = format!(
        "substring('\\x00010005'::bytea || convert_to('pgbench:' || :u || ':' || :r, 'UTF8') \
         || {filler} FROM 1 FOR {size})"
    );
    let digests = format!("ARRAY[sha256({data})]::bytea[]");
    let datas = format!("ARRAY[{data}]::bytea[]");

    let consume_sql = statement(&bind(
        CONSUME,
        // A caller of `callers`, without an idempotency key; NULL now: the budgets run on the
        // database's clock, as the server's do; NULL suites: any package, as a claim without
        // `?ciphersuite=`; a per-caller stage of interval 0 is off (NULL), as the server binds it.
        &[
            user,
            "'c' || :c",
            "NULL::text",
            "0::bigint",
            "NULL::bigint",
            "NULL::integer[]",
            ":interval::bigint",
            ":window::bigint",
            "NULLIF(:caller_interval, 0)::bigint",
            "NULLIF(:caller_window, 0)::bigint",
            "NULLIF(:pair_interval, 0)::bigint",
            "NULLIF(:pair_window, 0)::bigint",
        ],
    ));
    let expiry = format!("int8send({now_s} + 86400)");
    let upload_sql = statement(&bind(
        UPLOAD,
        &[
            user,
            fingerprint,
            now_s,
            &now_key,
            &digests,
            &datas,
            // The facts of a readable suite-1 package valid for a day, as the server stores them.
            "ARRAY[1]::integer[]",
            &format!("ARRAY[{expiry}]::bytea[]"),
            &format!("ARRAY[sha256({data})]::bytea[]"),
            &expiry,
            "NULL::bytea",
            "NULL::bytea",
            "NULL::integer",
            "NULL::bytea",
            "NULL::bytea",
            "10::integer",
        ],
    ));

    let random_caller = "\\set c random(0, :callers - 1)\n";
    let random_target = format!("\\set u random(0, :users - 1)\n{random_caller}");
    let random_writer = format!(
        "\\set u random(0, :writers - 1)\n\\set r random(0, 1000000000000000)\n{random_caller}"
    );
    std::fs::create_dir_all(out)?;
    let write = |name: &str, body: String| -> Result<()> {
        let path = out.join(name);
        std::fs::write(&path, body).with_context(|| format!("write {}", path.display()))
    };
    write("consume.sql", format!("{random_target}{consume_sql}"))?;
    write("upload.sql", format!("{random_writer}{upload_sql}"))?;
    // Consume from a writer, then upload one package to the same writer: stable inventories.
    let mut mixed = String::new();
    let _ = write!(mixed, "{random_writer}{consume_sql}{upload_sql}");
    write("mixed.sql", mixed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scripts_bind_every_parameter_of_the_stores_statements() {
        let dir = std::env::temp_dir().join(format!("kps-pgbench-{}", std::process::id()));
        write_scripts(&dir, 256).unwrap();
        for name in ["consume.sql", "upload.sql", "mixed.sql"] {
            let script = std::fs::read_to_string(dir.join(name)).unwrap();
            let unbound = script
                .as_bytes()
                .windows(2)
                .any(|w| w[0] == b'$' && w[1].is_ascii_digit());
            assert!(!unbound, "{name} leaves a $n parameter unbound:\n{script}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parameters_are_replaced_highest_first() {
        assert_eq!(bind("SELECT $1, $2", &["'a'", "2"]), "SELECT ('a'), (2)");
        let ten: Vec<String> = (1..=10).map(|i| i.to_string()).collect();
        let ten: Vec<&str> = ten.iter().map(String::as_str).collect();
        assert_eq!(bind("$10 $1", &ten), "(10) (1)");
    }
}
