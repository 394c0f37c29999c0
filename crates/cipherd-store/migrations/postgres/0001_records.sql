-- cipherd PostgreSQL schema, version 1.
--
-- Never edit this file once released: sqlx records a checksum of every applied
-- migration and refuses to open a database whose history no longer matches.
-- Change the schema by adding 0002_*.sql (and registering it in src/postgres.rs).

-- Store-wide revisions. A sequence never hands out a value twice, not even to a
-- transaction that rolls back, so a revision is never reused (gaps are harmless).
CREATE SEQUENCE revisions AS bigint MINVALUE 1 START WITH 1 NO CYCLE;

-- Opaque, barrier-encrypted records. `path` uses the "C" collation (bytewise
-- comparison), which for UTF-8 is byte order: `list` relies on it whatever the
-- database's default collation. The primary key makes a create's put-if-absent a
-- constraint, and every compare-and-set is one UPDATE ... WHERE path = $1 AND
-- revision = $2 under the row lock, so concurrent writers in any number of
-- processes are serialized by PostgreSQL itself, whatever the isolation level.
CREATE TABLE records (
    path     text COLLATE "C" NOT NULL PRIMARY KEY
             CHECK (octet_length(path) BETWEEN 1 AND 512 AND left(path, 1) <> '/'),
    value    bytea  NOT NULL,
    -- UNIQUE because no two live records can ever share a revision.
    revision bigint NOT NULL UNIQUE CHECK (revision > 0)
);

-- Values are ciphertext, which does not compress: store them out of line without
-- trying.
ALTER TABLE records ALTER COLUMN value SET STORAGE EXTERNAL;

-- The change feed: every committed write of a record, whoever made it (another
-- cipherd replica, or an operator by hand), is announced on the channel
-- `cipherd_changes` with the payload '<revision> <path>', or '- <path>' for a
-- delete. NOTIFY is transactional: delivered at commit, in commit order, and
-- never for a write that rolled back.
CREATE FUNCTION cipherd_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('cipherd_changes', '- ' || OLD.path);
    ELSE
        PERFORM pg_notify('cipherd_changes', NEW.revision::text || ' ' || NEW.path);
    END IF;
    RETURN NULL;
END;
$$;

CREATE TRIGGER records_notify_change
    AFTER INSERT OR UPDATE OR DELETE ON records
    FOR EACH ROW EXECUTE FUNCTION cipherd_notify_change();
