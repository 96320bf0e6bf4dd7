//! pgbench scripts carrying exactly the SQL the Postgres store issues, read from the store's
//! source so the ceiling cannot drift from the server: the statement constants are extracted
//! verbatim and only their `$n` parameters are replaced by pgbench variables.

use std::{fmt::Write as _, path::Path};

use anyhow::{bail, Context, Result};

/// The body of `const NAME: &str = "...";` in Rust source, with string escapes resolved.
fn rust_str_const(source: &str, name: &str) -> Result<String> {
    let start_marker = format!("const {name}: &str = \"");
    let start = source
        .find(&start_marker)
        .with_context(|| format!("no `const {name}` in the store source"))?
        + start_marker.len();
    let mut out = String::new();
    let mut chars = source[start..].chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Ok(out),
            '\\' => match chars.next() {
                // A line continuation drops the newline and the next line's indentation.
                Some('\n') => {
                    while chars.peek().is_some_and(|c| c.is_whitespace()) {
                        chars.next();
                    }
                }
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('\\') => out.push('\\'),
                Some('"') => out.push('"'),
                other => bail!("unsupported escape \\{other:?} in {name}"),
            },
            c => out.push(c),
        }
    }
    bail!("unterminated string in {name}")
}

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

/// Writes `consume.sql`, `upload.sql` and `mixed.sql` into `out`, from the store source at
/// `source`, uploading packages of `size` bytes. pgbench variables: `users`, `writers`,
/// `interval` and `window` (ms).
pub fn write_scripts(source: &Path, out: &Path, size: usize) -> Result<()> {
    let src =
        std::fs::read_to_string(source).with_context(|| format!("read {}", source.display()))?;
    let consume = rust_str_const(&src, "CONSUME")?;
    let lock_user = rust_str_const(&src, "LOCK_USER")?;
    let write_plan = rust_str_const(&src, "WRITE_PLAN")?;
    let status = rust_str_const(&src, "STATUS")?;
    // The one statement of the upload path that is written inline rather than as a constant.
    const HELD: &str = "SELECT digest FROM key_packages WHERE user_id = $1";
    if !src.contains(&format!("\"{HELD}\"")) {
        bail!("the upload path no longer reads `{HELD}`: update bench/src/pgbench.rs");
    }
    for call in [
        "query(CONSUME)",
        "query_scalar(LOCK_USER)",
        "query_scalar(WRITE_PLAN)",
    ] {
        if !src.contains(call) {
            bail!("the store no longer runs `{call}`: update bench/src/pgbench.rs");
        }
    }

    let now_ms = "floor(extract(epoch FROM now()) * 1000)::bigint";
    let now_s = "extract(epoch FROM now())::bigint";
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
        &consume,
        &[user, now_ms, ":interval::bigint", ":window::bigint"],
    ));
    let mut upload_sql = String::new();
    upload_sql.push_str("BEGIN;\n");
    upload_sql.push_str(&statement(&bind(&lock_user, &[user, fingerprint, now_s])));
    upload_sql.push_str(&statement(&bind(HELD, &[user])));
    upload_sql.push_str(&statement(&bind(
        &write_plan,
        &[
            user,
            &digests,
            &datas,
            fingerprint,
            "9::bigint",
            "NULL::bytea",
            "NULL::bytea",
        ],
    )));
    upload_sql.push_str(&statement(&bind(&status, &[user])));
    upload_sql.push_str("COMMIT;\n");

    let random_target = "\\set u random(0, :users - 1)\n";
    let random_writer = "\\set u random(0, :writers - 1)\n\\set r random(0, 1000000000000000)\n";
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
    fn constants_are_extracted_with_continuations_resolved() {
        let src = "const A: &str = \"\\\n    SELECT $1,\n  $2 \\\"x\\\"\";";
        assert_eq!(rust_str_const(src, "A").unwrap(), "SELECT $1,\n  $2 \"x\"");
        assert_eq!(bind("SELECT $1, $2", &["'a'", "2"]), "SELECT ('a'), (2)");
    }
}
