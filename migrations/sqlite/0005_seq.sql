-- The FIFO order column is called `seq`, as on Postgres, where it is a per-user counter. Here it
-- stays the rowid: one writer serialises every upload, so a file-wide sequence costs nothing.
ALTER TABLE key_packages RENAME COLUMN id TO seq;
