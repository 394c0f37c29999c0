-- cipherd SQLite schema, version 1.
--
-- Never edit this file once released: sqlx records a checksum of every applied
-- migration and refuses to open a database whose history no longer matches.
-- Change the schema by adding 0002_*.sql (and registering it in src/sqlite.rs).

-- Opaque, barrier-encrypted records. `path` is compared with SQLite's default
-- BINARY collation (memcmp), which for UTF-8 is byte order: `list` relies on it.
-- A rowid table rather than WITHOUT ROWID because values can be large (SQLite
-- advises WITHOUT ROWID only for small rows).
CREATE TABLE records (
    path     TEXT    NOT NULL PRIMARY KEY
                     CHECK (length(CAST(path AS BLOB)) BETWEEN 1 AND 512
                            AND substr(path, 1, 1) <> '/'),
    value    BLOB    NOT NULL,
    -- Store-wide revision of the last write; UNIQUE because no two live records
    -- can ever share a revision (and it makes MAX(revision) an index lookup).
    revision INTEGER NOT NULL UNIQUE CHECK (revision > 0)
) STRICT;

-- The store-wide revision counter: exactly one row, bumped in the same
-- transaction as every create and compare-and-set, so a revision is never
-- reused, not even after a delete and re-create of the same path.
CREATE TABLE revision_counter (
    id      INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    current INTEGER NOT NULL CHECK (current >= 0)
) STRICT;

INSERT INTO revision_counter (id, current) VALUES (1, 0);
