-- usher's shared store, SQLite flavour. Times are Unix seconds.

CREATE TABLE backends (
    id              INTEGER PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    host            TEXT NOT NULL,
    imap_port       INTEGER CHECK (imap_port BETWEEN 1 AND 65535),
    submission_port INTEGER CHECK (submission_port BETWEEN 1 AND 65535),
    tls             TEXT NOT NULL DEFAULT 'none'
                    CHECK (tls IN ('none', 'starttls', 'implicit')),
    -- CA bundle for this backend's certificate; NULL means the config's.
    ca_file         TEXT,
    login           TEXT NOT NULL DEFAULT 'master'
                    CHECK (login IN ('master', 'passthrough')),
    forward         TEXT NOT NULL DEFAULT 'id'
                    CHECK (forward IN ('none', 'id', 'xclient', 'proxy')),
    pool            TEXT NOT NULL DEFAULT 'default',
    site            TEXT,
    weight          INTEGER NOT NULL DEFAULT 100 CHECK (weight >= 0),
    state           TEXT NOT NULL DEFAULT 'active'
                    CHECK (state IN ('active', 'draining', 'disabled')),
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);

CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    -- Canonical login: lower-case, with domain.
    login         TEXT NOT NULL UNIQUE,
    -- PHC string; argon2id is what usher writes.
    password_hash TEXT NOT NULL,
    enabled       INTEGER NOT NULL DEFAULT 1,
    backend_id    INTEGER REFERENCES backends(id) ON DELETE RESTRICT,
    fallback_id   INTEGER REFERENCES backends(id) ON DELETE RESTRICT,
    pool          TEXT NOT NULL DEFAULT 'default',
    -- Logins wait while a move runs, until this time (Unix milliseconds).
    hold_until    INTEGER,
    display_name  TEXT,
    note          TEXT,
    version       INTEGER NOT NULL DEFAULT 1,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);

CREATE TABLE aliases (
    alias   TEXT PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE
);

CREATE TABLE app_passwords (
    id            INTEGER PRIMARY KEY,
    user_id       INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    label         TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    last_used_at  INTEGER,
    UNIQUE (user_id, label)
);

-- Change feed: servers follow it to drop cached state and end sessions.
CREATE TABLE events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    -- What changed, e.g. user.password, user.moved, backend.drain.
    kind    TEXT NOT NULL,
    -- The user's canonical login or the backend's name.
    subject TEXT NOT NULL,
    -- Kind-specific detail, e.g. the spread of a drain's kicks in seconds.
    detail  TEXT,
    at      INTEGER NOT NULL
);
