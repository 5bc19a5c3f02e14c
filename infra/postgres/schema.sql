-- The users table of the course's social network, on the master and the replica alike.
-- Both clusters are created with the C collation (initdb --locale=C), so a b-tree
-- on the names serves prefix search: `first_name >= 'Ив' AND first_name < 'Иг'`
-- (and LIKE 'Ив%') walk the index instead of the table.

CREATE TABLE IF NOT EXISTS users (
    id            uuid        PRIMARY KEY,
    first_name    text        NOT NULL,
    second_name   text        NOT NULL,
    birthdate     date        NOT NULL,
    biography     text        NOT NULL DEFAULT '',
    city          text        NOT NULL DEFAULT '',
    password_hash text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- id last makes the index cover the search's ORDER BY tie-break cheaply.
CREATE INDEX IF NOT EXISTS users_name_prefix_idx ON users (first_name, second_name, id);
