//! The gateway's database: SQLite (embedded) or PostgreSQL (shared by replicas), one interface
//! over `sqlx::Any`. Queries are written once with `$N` placeholders, which both drivers read;
//! the schema differs only in id and blob types, so each backend has its own migration directory.
//!
//! The two rules that must hold across replicas are single statements that only one caller can
//! win: a token is consumed by an `UPDATE … WHERE consumed_by IS NULL OR consumed_by = <this CSR>`,
//! and a CSR is claimed for upstream by an `INSERT … ON CONFLICT DO NOTHING` of its
//! (label, csr_sha256) row.

use crate::error::Error;
use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

/// Which database is behind the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The store; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

/// A request's progress upstream (`requests.state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Claimed; the upstream submit call is running (or its replica died during it).
    Submitting,
    /// Upstream accepted it and will decide later.
    Pending,
    /// Claimed for one poll call.
    Polling,
    Issued,
    /// The vendor refused; `reason` holds its words.
    Refused,
    /// Upstream answered something unusable; `reason` says what.
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Submitting => "submitting",
            State::Pending => "pending",
            State::Polling => "polling",
            State::Issued => "issued",
            State::Refused => "refused",
            State::Failed => "failed",
        }
    }
    fn parse(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "submitting" => State::Submitting,
            "pending" => State::Pending,
            "polling" => State::Polling,
            "issued" => State::Issued,
            "refused" => State::Refused,
            "failed" => State::Failed,
            other => {
                return Err(Error::new(
                    crate::error::Kind::Storage,
                    format!("requests.state {other:?} is unknown"),
                ))
            }
        })
    }
}

/// One row of `requests`.
#[derive(Clone, Debug)]
pub struct RequestRow {
    pub device: String,
    pub operation: String,
    pub state: State,
    pub upstream_ref: Option<String>,
    pub reason: Option<String>,
    pub retry_after_s: Option<i64>,
    pub updated_at: i64,
}

/// A request whose submission upstream was claimed and never finished (`request stuck`).
#[derive(Clone, Debug, Serialize)]
pub struct StuckRequest {
    pub label: String,
    pub csr_sha256: String,
    pub device: String,
    pub operation: String,
    pub claimed_at: i64,
}

/// One issued certificate.
#[derive(Clone, Debug, Serialize)]
pub struct IssuedRecord {
    pub label: String,
    pub device: String,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub upstream_ref: Option<String>,
    pub csr_sha256: String,
    pub cert_sha256: String,
    #[serde(skip)]
    pub cert_der: Vec<u8>,
    pub issued_at: i64,
}

/// What `device list` shows per device.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceSummary {
    pub device: String,
    pub revoked: bool,
    pub certificates: i64,
    pub latest_not_after: Option<i64>,
}

/// One decision (`audit`).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct AuditRow {
    pub at: i64,
    pub peer: String,
    pub who: String,
    pub label: String,
    pub operation: String,
    pub outcome: String,
    pub upstream_ref: Option<String>,
    pub reason: Option<String>,
}

fn db(step: &str) -> impl FnOnce(sqlx::Error) -> Error + '_ {
    move |e| Error::storage(format!("database: {step}"), e)
}

static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

impl Store {
    /// Connects (a SQLite file is created when missing). Does not migrate.
    pub async fn open(db_cfg: &crate::config::Database) -> Result<Self, Error> {
        sqlx::any::install_default_drivers();
        let url = db_cfg.connect_url();
        let backend = if url.starts_with("sqlite:") { Backend::Sqlite } else { Backend::Postgres };
        let mut opts = AnyPoolOptions::new()
            .max_connections(db_cfg.max_connections)
            .acquire_timeout(std::time::Duration::from_secs(10));
        if backend == Backend::Sqlite {
            // Concurrent writers wait for the lock instead of failing at once.
            opts = opts.after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA busy_timeout = 10000").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                    Ok(())
                })
            });
        }
        let pool = opts
            .connect(url)
            .await
            .map_err(|e| Error::storage(format!("database {}: cannot connect", db_cfg.shown()), e))?;
        Ok(Self { pool, backend })
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn migrator(&self) -> &'static sqlx::migrate::Migrator {
        match self.backend {
            Backend::Sqlite => &SQLITE,
            Backend::Postgres => &POSTGRES,
        }
    }

    /// Applies pending migrations (`serve` does this at start).
    pub async fn migrate(&self) -> Result<(), Error> {
        self.migrator().run(&self.pool).await.map_err(|e| {
            Error::with_source(crate::error::Kind::Storage, "database: applying schema migrations", e)
        })
    }

    /// (applied schema version, newest version this build knows); 0 = none applied.
    pub async fn schema_version(&self) -> Result<(i64, i64), Error> {
        let latest = self.migrator().iter().map(|m| m.version).max().unwrap_or(0);
        let exists: i64 = match self.backend {
            Backend::Sqlite => sqlx::query_scalar(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
            ),
            Backend::Postgres => sqlx::query_scalar(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_name = '_sqlx_migrations'",
            ),
        }
        .fetch_one(&self.pool)
        .await
        .map_err(db("reading the schema version"))?;
        if exists == 0 {
            return Ok((0, latest));
        }
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success = $1")
                .bind(true)
                .fetch_one(&self.pool)
                .await
                .map_err(db("reading the schema version"))?;
        Ok((applied.unwrap_or(0), latest))
    }

    /// `SELECT 1` (for `/readyz`).
    pub async fn ping(&self) -> Result<(), Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map_err(db("ping"))?;
        Ok(())
    }

    // ---- tokens ----

    pub async fn token_create(
        &self,
        sha: &str,
        label: &str,
        device: &str,
        now: i64,
        expires: i64,
    ) -> Result<(), Error> {
        sqlx::query("INSERT INTO tokens (token_sha256, label, device, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(sha)
            .bind(label)
            .bind(device)
            .bind(now)
            .bind(expires)
            .execute(&self.pool)
            .await
            .map_err(db("storing the token"))?;
        Ok(())
    }

    /// Whether the token would authenticate this request (no change made).
    pub async fn token_usable(
        &self,
        sha: &str,
        label: &str,
        device: &str,
        csr_sha: &str,
        now: i64,
    ) -> Result<bool, Error> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM tokens WHERE token_sha256 = $1 AND label = $2 AND device = $3 \
             AND ((consumed_by IS NULL AND expires_at > $5) OR consumed_by = $4)",
        )
        .bind(sha)
        .bind(label)
        .bind(device)
        .bind(csr_sha)
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(db("reading the token"))?;
        Ok(n == 1)
    }

    /// Consumes the token for this CSR, atomically: true when it was unused and unexpired, or
    /// already consumed by this same CSR (an identical retry).
    pub async fn token_consume(
        &self,
        sha: &str,
        label: &str,
        device: &str,
        csr_sha: &str,
        now: i64,
    ) -> Result<bool, Error> {
        let r = sqlx::query(
            "UPDATE tokens SET consumed_by = $4, consumed_at = COALESCE(consumed_at, $5) \
             WHERE token_sha256 = $1 AND label = $2 AND device = $3 \
             AND ((consumed_by IS NULL AND expires_at > $5) OR consumed_by = $4)",
        )
        .bind(sha)
        .bind(label)
        .bind(device)
        .bind(csr_sha)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db("consuming the token"))?;
        Ok(r.rows_affected() == 1)
    }

    // ---- devices ----

    pub async fn device_seen(&self, device: &str, now: i64) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO devices (device, revoked, first_seen) VALUES ($1, 0, $2) ON CONFLICT DO NOTHING",
        )
        .bind(device)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db("recording the device"))?;
        Ok(())
    }

    pub async fn device_revoked(&self, device: &str) -> Result<bool, Error> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices WHERE device = $1 AND revoked <> 0")
            .bind(device)
            .fetch_one(&self.pool)
            .await
            .map_err(db("reading the device"))?;
        Ok(n > 0)
    }

    /// Marks the device revoked (recording it if never seen). False when it already was.
    pub async fn device_revoke(&self, device: &str, now: i64) -> Result<bool, Error> {
        self.device_seen(device, now).await?;
        let r =
            sqlx::query("UPDATE devices SET revoked = 1, revoked_at = $2 WHERE device = $1 AND revoked = 0")
                .bind(device)
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(db("revoking the device"))?;
        Ok(r.rows_affected() == 1)
    }

    pub async fn devices(&self) -> Result<Vec<DeviceSummary>, Error> {
        let rows = sqlx::query(
            "SELECT d.device, d.revoked, COUNT(c.id) AS n, MAX(c.not_after) AS latest \
             FROM devices d LEFT JOIN certificates c ON c.device = d.device \
             GROUP BY d.device, d.revoked ORDER BY d.device",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing devices"))?;
        rows.iter()
            .map(|r| {
                Ok(DeviceSummary {
                    device: r.try_get(0)?,
                    revoked: r.try_get::<i64, _>(1)? != 0,
                    certificates: r.try_get(2)?,
                    latest_not_after: r.try_get(3)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db("listing devices"))
    }

    /// The device's record, if it has one.
    pub async fn device(&self, device: &str) -> Result<Option<DeviceSummary>, Error> {
        Ok(self.devices().await?.into_iter().find(|d| d.device == device))
    }

    // ---- requests ----

    pub async fn request(&self, label: &str, csr_sha: &str) -> Result<Option<RequestRow>, Error> {
        let row = sqlx::query(
            "SELECT device, operation, state, upstream_ref, reason, retry_after_s, updated_at \
             FROM requests WHERE label = $1 AND csr_sha256 = $2",
        )
        .bind(label)
        .bind(csr_sha)
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading the request"))?;
        let Some(r) = row else { return Ok(None) };
        let get = |r: &AnyRow| -> Result<_, sqlx::Error> {
            Ok((
                r.try_get::<String, _>(0)?,
                r.try_get::<String, _>(1)?,
                r.try_get::<String, _>(2)?,
                r.try_get::<Option<String>, _>(3)?,
                r.try_get::<Option<String>, _>(4)?,
                r.try_get::<Option<i64>, _>(5)?,
                r.try_get::<i64, _>(6)?,
            ))
        };
        let (device, operation, state, upstream_ref, reason, retry_after_s, updated_at) =
            get(&r).map_err(db("reading the request"))?;
        Ok(Some(RequestRow {
            device,
            operation,
            state: State::parse(&state)?,
            upstream_ref,
            reason,
            retry_after_s,
            updated_at,
        }))
    }

    /// Claims (label, csr) for its one upstream submission. True for exactly one caller.
    pub async fn request_claim(
        &self,
        label: &str,
        csr_sha: &str,
        device: &str,
        operation: &str,
        now: i64,
    ) -> Result<bool, Error> {
        let r = sqlx::query(
            "INSERT INTO requests (label, csr_sha256, device, operation, state, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, 'submitting', $5, $5) ON CONFLICT DO NOTHING",
        )
        .bind(label)
        .bind(csr_sha)
        .bind(device)
        .bind(operation)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db("claiming the request"))?;
        Ok(r.rows_affected() == 1)
    }

    /// Claims a pending request for one poll call (or a poll claim older than `stale_before`,
    /// whose replica died). True for exactly one caller.
    pub async fn request_claim_poll(
        &self,
        label: &str,
        csr_sha: &str,
        now: i64,
        stale_before: i64,
    ) -> Result<bool, Error> {
        let r = sqlx::query(
            "UPDATE requests SET state = 'polling', updated_at = $3 WHERE label = $1 AND csr_sha256 = $2 \
             AND (state = 'pending' OR (state = 'polling' AND updated_at < $4))",
        )
        .bind(label)
        .bind(csr_sha)
        .bind(now)
        .bind(stale_before)
        .execute(&self.pool)
        .await
        .map_err(db("claiming the request for a poll"))?;
        Ok(r.rows_affected() == 1)
    }

    /// Records an upstream answer that is not a certificate.
    #[allow(clippy::too_many_arguments)]
    pub async fn request_set(
        &self,
        label: &str,
        csr_sha: &str,
        state: State,
        upstream_ref: Option<&str>,
        reason: Option<&str>,
        retry_after_s: Option<i64>,
        now: i64,
    ) -> Result<(), Error> {
        sqlx::query(
            "UPDATE requests SET state = $3, upstream_ref = COALESCE($4, upstream_ref), reason = $5, \
             retry_after_s = $6, updated_at = $7 WHERE label = $1 AND csr_sha256 = $2",
        )
        .bind(label)
        .bind(csr_sha)
        .bind(state.as_str())
        .bind(upstream_ref)
        .bind(reason)
        .bind(retry_after_s)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db("updating the request"))?;
        Ok(())
    }

    /// Drops a claim whose submission upstream did not take (unreachable), so a retry may submit.
    pub async fn request_release(&self, label: &str, csr_sha: &str) -> Result<(), Error> {
        sqlx::query("DELETE FROM requests WHERE label = $1 AND csr_sha256 = $2 AND state = 'submitting'")
            .bind(label)
            .bind(csr_sha)
            .execute(&self.pool)
            .await
            .map_err(db("releasing the request"))?;
        Ok(())
    }

    /// Submissions claimed before `stale_before` and never finished: their replica died during
    /// the vendor call.
    pub async fn stuck_requests(&self, stale_before: i64) -> Result<Vec<StuckRequest>, Error> {
        let rows = sqlx::query(
            "SELECT label, csr_sha256, device, operation, updated_at FROM requests \
             WHERE state = 'submitting' AND updated_at < $1 ORDER BY updated_at",
        )
        .bind(stale_before)
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing stuck requests"))?;
        rows.iter()
            .map(|r| {
                Ok(StuckRequest {
                    label: r.try_get(0)?,
                    csr_sha256: r.try_get(1)?,
                    device: r.try_get(2)?,
                    operation: r.try_get(3)?,
                    claimed_at: r.try_get(4)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db("listing stuck requests"))
    }

    /// Drops a stuck submission (claimed before `stale_before`), so the device's next identical
    /// request is submitted again. False when there is no such stuck request.
    pub async fn release_stuck(&self, label: &str, csr_sha: &str, stale_before: i64) -> Result<bool, Error> {
        let r = sqlx::query(
            "DELETE FROM requests WHERE label = $1 AND csr_sha256 = $2 AND state = 'submitting' \
             AND updated_at < $3",
        )
        .bind(label)
        .bind(csr_sha)
        .bind(stale_before)
        .execute(&self.pool)
        .await
        .map_err(db("releasing the stuck request"))?;
        Ok(r.rows_affected() == 1)
    }

    /// Requests of this device and label since `since` that count against the daily quota:
    /// issued ones and ones still in flight.
    pub async fn requests_since(&self, label: &str, device: &str, since: i64) -> Result<i64, Error> {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM requests WHERE label = $1 AND device = $2 AND created_at >= $3 \
             AND state IN ('submitting', 'pending', 'polling', 'issued')",
        )
        .bind(label)
        .bind(device)
        .bind(since)
        .fetch_one(&self.pool)
        .await
        .map_err(db("counting the device's requests"))
    }

    /// Requests waiting for the vendor (the pending gauge).
    pub async fn pending_count(&self) -> Result<i64, Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM requests WHERE state IN ('pending', 'polling')")
            .fetch_one(&self.pool)
            .await
            .map_err(db("counting pending requests"))
    }

    // ---- certificates ----

    /// Stores an issued certificate and marks its request issued, in one transaction.
    pub async fn issued(&self, rec: &IssuedRecord, now: i64) -> Result<(), Error> {
        let mut tx = self.pool.begin().await.map_err(db("storing the certificate"))?;
        sqlx::query(
            "INSERT INTO certificates (label, device, serial, not_before, not_after, upstream_ref, csr_sha256, \
             cert_sha256, cert_der, issued_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&rec.label)
        .bind(&rec.device)
        .bind(&rec.serial)
        .bind(rec.not_before)
        .bind(rec.not_after)
        .bind(rec.upstream_ref.as_deref())
        .bind(&rec.csr_sha256)
        .bind(&rec.cert_sha256)
        .bind(rec.cert_der.clone())
        .bind(rec.issued_at)
        .execute(&mut *tx)
        .await
        .map_err(db("storing the certificate"))?;
        sqlx::query(
            "UPDATE requests SET state = 'issued', upstream_ref = COALESCE($3, upstream_ref), reason = NULL, \
             updated_at = $4 WHERE label = $1 AND csr_sha256 = $2",
        )
        .bind(&rec.label)
        .bind(&rec.csr_sha256)
        .bind(rec.upstream_ref.as_deref())
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db("storing the certificate"))?;
        sqlx::query(
            "INSERT INTO devices (device, revoked, first_seen) VALUES ($1, 0, $2) ON CONFLICT DO NOTHING",
        )
        .bind(&rec.device)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db("storing the certificate"))?;
        tx.commit().await.map_err(db("storing the certificate"))?;
        Ok(())
    }

    const CERT_COLUMNS: &'static str =
        "label, device, serial, not_before, not_after, upstream_ref, csr_sha256, cert_sha256, cert_der, issued_at";

    fn cert_row(r: &AnyRow) -> Result<IssuedRecord, sqlx::Error> {
        Ok(IssuedRecord {
            label: r.try_get(0)?,
            device: r.try_get(1)?,
            serial: r.try_get(2)?,
            not_before: r.try_get(3)?,
            not_after: r.try_get(4)?,
            upstream_ref: r.try_get(5)?,
            csr_sha256: r.try_get(6)?,
            cert_sha256: r.try_get(7)?,
            cert_der: r.try_get(8)?,
            issued_at: r.try_get(9)?,
        })
    }

    async fn certs_where(&self, cond: &str, binds: &[&str]) -> Result<Vec<IssuedRecord>, Error> {
        let sql =
            format!("SELECT {} FROM certificates WHERE {cond} ORDER BY issued_at, id", Self::CERT_COLUMNS);
        let mut q = sqlx::query(&sql);
        for b in binds {
            q = q.bind(*b);
        }
        let rows = q.fetch_all(&self.pool).await.map_err(db("reading certificates"))?;
        rows.iter().map(Self::cert_row).collect::<Result<_, _>>().map_err(db("reading certificates"))
    }

    /// The certificate issued for (label, csr), if any.
    pub async fn certificate_for_csr(
        &self,
        label: &str,
        csr_sha: &str,
    ) -> Result<Option<IssuedRecord>, Error> {
        Ok(self.certs_where("label = $1 AND csr_sha256 = $2", &[label, csr_sha]).await?.pop())
    }

    /// The stored record of a certificate, by the SHA-256 of its DER.
    pub async fn certificate_by_hash(&self, cert_sha: &str) -> Result<Option<IssuedRecord>, Error> {
        Ok(self.certs_where("cert_sha256 = $1", &[cert_sha]).await?.pop())
    }

    pub async fn certificates_of(&self, device: &str) -> Result<Vec<IssuedRecord>, Error> {
        self.certs_where("device = $1", &[device]).await
    }

    // ---- audit ----

    pub async fn audit(&self, a: &AuditRow) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO audit (at, peer, who, label, operation, outcome, upstream_ref, reason) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(a.at)
        .bind(&a.peer)
        .bind(&a.who)
        .bind(&a.label)
        .bind(&a.operation)
        .bind(&a.outcome)
        .bind(a.upstream_ref.as_deref())
        .bind(a.reason.as_deref())
        .execute(&self.pool)
        .await
        .map_err(db("writing the audit log"))?;
        Ok(())
    }

    pub async fn audit_since(&self, since: i64) -> Result<Vec<AuditRow>, Error> {
        let rows = sqlx::query(
            "SELECT at, peer, who, label, operation, outcome, upstream_ref, reason FROM audit \
             WHERE at >= $1 ORDER BY at, id",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await
        .map_err(db("reading the audit log"))?;
        rows.iter()
            .map(|r| {
                Ok(AuditRow {
                    at: r.try_get(0)?,
                    peer: r.try_get(1)?,
                    who: r.try_get(2)?,
                    label: r.try_get(3)?,
                    operation: r.try_get(4)?,
                    outcome: r.try_get(5)?,
                    upstream_ref: r.try_get(6)?,
                    reason: r.try_get(7)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(db("reading the audit log"))
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
