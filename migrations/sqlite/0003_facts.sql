-- v1.1: the facts the server reads from each package (see src/mls_codec.rs).
--
-- cipher_suite: the package's suite; 0 for an opaque package; NULL for a package stored by an
--   earlier version and not read yet (the start-up backfill reads those, in batches).
-- not_after:    lifetime.not_after as 8 big-endian bytes (BLOBs compare with memcmp, so as the
--   u64 does, for every u64; an INTEGER cannot hold them all); NULL for an opaque package, which
--   never expires.
-- key_package_ref: the KeyPackageRef; NULL when opaque or the suite's hash is unknown.
ALTER TABLE key_packages ADD COLUMN cipher_suite INTEGER;
ALTER TABLE key_packages ADD COLUMN not_after BLOB;
ALTER TABLE key_packages ADD COLUMN key_package_ref BLOB;
ALTER TABLE users ADD COLUMN last_resort_cipher_suite INTEGER;
ALTER TABLE users ADD COLUMN last_resort_not_after BLOB;
ALTER TABLE users ADD COLUMN last_resort_ref BLOB;

-- What the backfill has left to read: small, and empty once it has run.
CREATE INDEX key_packages_unread ON key_packages (id) WHERE cipher_suite IS NULL;
CREATE INDEX users_last_resort_unread ON users (user_id)
    WHERE last_resort IS NOT NULL AND last_resort_cipher_suite IS NULL;
