-- enroll-gateway schema v1 (design.md §9). Times are Unix seconds; hashes are lowercase hex SHA-256.

-- One-time enrollment passwords: only their SHA-256 is kept. consumed_by is the SHA-256 of the
-- CSR DER the token authenticated; identical retries of that request keep being accepted.
CREATE TABLE tokens (
    token_sha256 TEXT PRIMARY KEY,
    label TEXT NOT NULL,
    device TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    consumed_by TEXT,
    consumed_at BIGINT
);

CREATE TABLE devices (
    device TEXT PRIMARY KEY,
    revoked BIGINT NOT NULL DEFAULT 0,
    revoked_at BIGINT,
    first_seen BIGINT NOT NULL
);

-- Every CSR forwarded upstream, keyed by (label, SHA-256 of the CSR DER). The row is inserted
-- (state 'submitting') before the upstream call; only one INSERT wins, so no CSR is forwarded twice.
-- state: submitting | pending | polling | issued | refused | failed
CREATE TABLE requests (
    label TEXT NOT NULL,
    csr_sha256 TEXT NOT NULL,
    device TEXT NOT NULL,
    operation TEXT NOT NULL,
    state TEXT NOT NULL,
    upstream_ref TEXT,
    reason TEXT,
    retry_after_s BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (label, csr_sha256)
);
CREATE INDEX requests_device ON requests (label, device, created_at);

CREATE TABLE certificates (
    id BIGSERIAL PRIMARY KEY,
    label TEXT NOT NULL,
    device TEXT NOT NULL,
    serial TEXT NOT NULL,
    not_before BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    upstream_ref TEXT,
    csr_sha256 TEXT NOT NULL,
    cert_sha256 TEXT NOT NULL,
    cert_der BYTEA NOT NULL,
    issued_at BIGINT NOT NULL,
    UNIQUE (label, csr_sha256)
);
CREATE INDEX certificates_device ON certificates (device);
CREATE INDEX certificates_cert ON certificates (cert_sha256);

CREATE TABLE audit (
    id BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
    peer TEXT NOT NULL,
    who TEXT NOT NULL,
    label TEXT NOT NULL,
    operation TEXT NOT NULL,
    outcome TEXT NOT NULL,
    upstream_ref TEXT,
    reason TEXT
);
CREATE INDEX audit_at ON audit (at);
