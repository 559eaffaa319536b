//! Durable state of StacyVM.
//!
//! The store is the source of truth for sandbox records. Runtime objects
//! (containers, namespaces, …) are only ever created for a record that is
//! already stored, so after a crash every runtime can be matched to its
//! record, and every record to its runtime.
//!
//! The embedded backend is SQLite in WAL mode behind one connection; every
//! call is a short transaction. Callers on an async runtime should call it
//! from a blocking-capable context (the control plane wraps it).

pub mod audit;
pub mod keys;
mod model;
pub mod quotas;
pub mod templates;

pub use audit::{AuditFilter, AuditRecord, AuditVerify, NewAudit};
pub use keys::KeyRecord;
pub use model::{SandboxRecord, SandboxState};
pub use quotas::{AdmissionReport, QuotaLimits, QuotaRecord, SubjectUsage, Usage};
pub use templates::TemplateRow;

use rusqlite::{params, Connection, OptionalExtension, Row};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Admission refused: the global cap of live sandboxes is reached.
    #[error("sandbox capacity reached: {active} of {max} sandboxes are active")]
    CapacityExceeded { active: u64, max: u64 },
    /// A state change that the lifecycle does not allow.
    #[error("sandbox {id} cannot go from {from} to {to}")]
    IllegalTransition {
        id: String,
        from: SandboxState,
        to: SandboxState,
    },
    #[error("sandbox {0} not found")]
    NotFound(String),
    /// Admission refused by an owner's or key's quota (the message names it).
    #[error("{0}")]
    QuotaExceeded(String),
    /// A unique name is taken (templates).
    #[error("{0}")]
    Conflict(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Filters for [`Store::list_sandboxes`].
#[derive(Debug, Default, Clone)]
pub struct SandboxFilter {
    pub owner_id: Option<String>,
    pub state: Option<SandboxState>,
    /// Every `(key, value)` must be present in the metadata.
    pub labels: Vec<(String, String)>,
    pub include_destroyed: bool,
    /// Only sandboxes created by a key of this tenant.
    pub tenant: Option<String>,
    /// Only sandboxes created by a key of this identity.
    pub creator: Option<String>,
    /// Also list sandboxes waiting in a template's warm pool.
    pub include_pooled: bool,
}

pub struct Store {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sandboxes (
    id          TEXT PRIMARY KEY,
    state       TEXT NOT NULL,
    provider    TEXT NOT NULL,
    image       TEXT NOT NULL,
    memory_mb   INTEGER NOT NULL,
    vcpus       INTEGER NOT NULL,
    owner_id    TEXT,
    template    TEXT,
    network     TEXT NOT NULL,
    metadata    TEXT NOT NULL,
    env         TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    error       TEXT,
    runtime_id  TEXT
);
CREATE INDEX IF NOT EXISTS sandboxes_state ON sandboxes(state);
CREATE INDEX IF NOT EXISTS sandboxes_created ON sandboxes(created_at);
CREATE TABLE IF NOT EXISTS sandbox_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    sandbox_id  TEXT NOT NULL,
    at          INTEGER NOT NULL,
    message     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS sandbox_events_sb ON sandbox_events(sandbox_id, seq);
"#;

const COLUMNS: &str = "id, state, provider, image, memory_mb, vcpus, owner_id, template, network, \
     metadata, env, created_at, expires_at, updated_at, error, runtime_id, tenant, creator, pool";

/// Columns added after the first schema: `(table, column, type)`.
const ADDED_COLUMNS: [(&str, &str, &str); 4] = [
    ("sandboxes", "tenant", "TEXT"),
    ("sandboxes", "creator", "TEXT"),
    ("sandboxes", "pool", "TEXT"),
    ("sandboxes", "pool_ready", "INTEGER NOT NULL DEFAULT 0"),
];

/// Bring an existing database up to the current schema.
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    for (table, column, ty) in ADDED_COLUMNS {
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})"))?;
        let names = stmt
            .query_map([], |r| r.get::<_, String>(1))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        if !names.iter().any(|n| n == column) {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))?;
        }
    }
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS sandboxes_owner ON sandboxes(owner_id);
         CREATE INDEX IF NOT EXISTS sandboxes_creator ON sandboxes(creator);
         CREATE INDEX IF NOT EXISTS sandboxes_pool ON sandboxes(pool);",
    )?;
    conn.execute_batch(keys::SCHEMA)?;
    conn.execute_batch(quotas::SCHEMA)?;
    conn.execute_batch(audit::SCHEMA)?;
    conn.execute_batch(templates::SCHEMA)?;
    Ok(())
}

fn row_to_record(row: &Row<'_>) -> rusqlite::Result<(SandboxRecord, String, String, String)> {
    let state: String = row.get(1)?;
    let metadata: String = row.get(9)?;
    let env: String = row.get(10)?;
    let rec = SandboxRecord {
        id: row.get(0)?,
        state: SandboxState::Error, // fixed up by the caller
        provider: row.get(2)?,
        image: row.get(3)?,
        memory_mb: row.get::<_, i64>(4)? as u64,
        vcpus: row.get::<_, i64>(5)? as u32,
        owner_id: row.get(6)?,
        template: row.get(7)?,
        network: row.get(8)?,
        metadata: BTreeMap::new(),
        env: BTreeMap::new(),
        created_at_ms: row.get(11)?,
        expires_at_ms: row.get(12)?,
        updated_at_ms: row.get(13)?,
        error: row.get(14)?,
        runtime_id: row.get(15)?,
        tenant: row.get(16)?,
        creator: row.get(17)?,
        pool: row.get(18)?,
    };
    Ok((rec, state, metadata, env))
}

fn finish(parts: (SandboxRecord, String, String, String)) -> Result<SandboxRecord> {
    let (mut rec, state, metadata, env) = parts;
    rec.state = state.parse().map_err(|_| {
        StoreError::Corrupt(format!("sandbox {} has unknown state {state:?}", rec.id))
    })?;
    rec.metadata = serde_json::from_str(&metadata)
        .map_err(|e| StoreError::Corrupt(format!("sandbox {} metadata: {e}", rec.id)))?;
    rec.env = serde_json::from_str(&env)
        .map_err(|e| StoreError::Corrupt(format!("sandbox {} env: {e}", rec.id)))?;
    Ok(rec)
}

fn to_json(m: &BTreeMap<String, String>) -> String {
    serde_json::to_string(m).unwrap_or_else(|_| "{}".to_string())
}

fn insert_sandbox(tx: &Connection, rec: &SandboxRecord) -> Result<()> {
    tx.execute(
        &format!(
            "INSERT INTO sandboxes ({COLUMNS}) VALUES \
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)"
        ),
        params![
            rec.id,
            rec.state.as_str(),
            rec.provider,
            rec.image,
            rec.memory_mb as i64,
            rec.vcpus as i64,
            rec.owner_id,
            rec.template,
            rec.network,
            to_json(&rec.metadata),
            to_json(&rec.env),
            rec.created_at_ms,
            rec.expires_at_ms,
            rec.updated_at_ms,
            rec.error,
            rec.runtime_id,
            rec.tenant,
            rec.creator,
            rec.pool,
        ],
    )?;
    Ok(())
}

pub(crate) fn active_states_sql() -> String {
    SandboxState::ACTIVE
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(",")
}

impl Store {
    /// Open (or create) the database file and bring its schema up to date.
    pub fn open(path: &Path) -> Result<Store> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrate(&conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    /// Open an existing database without changing it (`stacyvm audit verify`).
    pub fn open_read_only(path: &Path) -> Result<Store> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    /// A private in-memory store (unit tests).
    pub fn open_in_memory() -> Result<Store> {
        let conn = Connection::open_in_memory()?;
        migrate(&conn)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (transactions roll back), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cheap round trip to prove the database answers.
    pub fn ping(&self) -> Result<()> {
        self.conn().query_row("SELECT 1", [], |_| Ok(()))?;
        Ok(())
    }

    /// Value of a `meta` key, creating it with `init()` when absent.
    pub fn meta_get_or_init(&self, key: &str, init: impl FnOnce() -> String) -> Result<String> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let existing: Option<String> = tx
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?;
        let value = match existing {
            Some(v) => v,
            None => {
                let v = init();
                tx.execute(
                    "INSERT INTO meta(key, value) VALUES (?1, ?2)",
                    params![key, v],
                )?;
                v
            }
        };
        tx.commit()?;
        Ok(value)
    }

    /// Admit and store a new sandbox in one atomic step: fails with
    /// [`StoreError::CapacityExceeded`] when `max_active` sandboxes are
    /// already active, and with [`StoreError::QuotaExceeded`] when the
    /// quota of its owner or of the key identity that creates it
    /// (`creator`) would be passed. Quotas are read in the same
    /// `BEGIN IMMEDIATE` transaction, so parallel creates cannot over-admit.
    pub fn admit_sandbox(&self, rec: &SandboxRecord, max_active: u64) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let report = quotas::evaluate(&tx, rec, max_active, false)?;
        if let Some(refusal) = report.refusal {
            return Err(refusal);
        }
        insert_sandbox(&tx, rec)?;
        tx.commit()?;
        Ok(())
    }

    /// The admission decision for `rec` as [`Store::admit_sandbox`] would
    /// take it now, without storing anything.
    pub fn check_admission(&self, rec: &SandboxRecord, max_active: u64) -> Result<AdmissionReport> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let report = quotas::evaluate(&tx, rec, max_active, false)?;
        tx.commit()?;
        Ok(report)
    }

    pub fn get_sandbox(&self, id: &str) -> Result<Option<SandboxRecord>> {
        let conn = self.conn();
        let parts = conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM sandboxes WHERE id = ?1"),
                [id],
                row_to_record,
            )
            .optional()?;
        parts.map(finish).transpose()
    }

    /// Sandboxes matching `filter`, newest first.
    pub fn list_sandboxes(&self, filter: &SandboxFilter) -> Result<Vec<SandboxRecord>> {
        let conn = self.conn();
        let mut sql = format!("SELECT {COLUMNS} FROM sandboxes WHERE 1=1");
        let mut args: Vec<String> = Vec::new();
        if !filter.include_destroyed {
            sql.push_str(" AND state != 'destroyed'");
        }
        if let Some(owner) = &filter.owner_id {
            args.push(owner.clone());
            sql.push_str(&format!(" AND owner_id = ?{}", args.len()));
        }
        if let Some(state) = filter.state {
            args.push(state.as_str().to_string());
            sql.push_str(&format!(" AND state = ?{}", args.len()));
        }
        if let Some(tenant) = &filter.tenant {
            args.push(tenant.clone());
            sql.push_str(&format!(" AND tenant = ?{}", args.len()));
        }
        if let Some(creator) = &filter.creator {
            args.push(creator.clone());
            sql.push_str(&format!(" AND creator = ?{}", args.len()));
        }
        if !filter.include_pooled {
            sql.push_str(" AND pool IS NULL");
        }
        sql.push_str(" ORDER BY created_at DESC, id DESC");
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), row_to_record)?;
        let mut out = Vec::new();
        for r in rows {
            let rec = finish(r?)?;
            if filter
                .labels
                .iter()
                .all(|(k, v)| rec.metadata.get(k) == Some(v))
            {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Records in the given states.
    pub fn list_in_states(&self, states: &[SandboxState]) -> Result<Vec<SandboxRecord>> {
        let conn = self.conn();
        let list = states
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(",");
        let mut stmt = conn.prepare(&format!(
            "SELECT {COLUMNS} FROM sandboxes WHERE state IN ({list}) ORDER BY created_at"
        ))?;
        let rows = stmt.query_map([], row_to_record)?;
        rows.map(|r| finish(r?)).collect()
    }

    /// Ids of not-yet-destroyed sandboxes whose TTL ran out at `now_ms`.
    pub fn list_expired(&self, now_ms: i64) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id FROM sandboxes WHERE state NOT IN ('destroyed', 'destroying', 'creating') \
             AND expires_at <= ?1 ORDER BY expires_at",
        )?;
        let rows = stmt.query_map([now_ms], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Number of active (creating, running, unhealthy) sandboxes.
    pub fn count_active(&self) -> Result<u64> {
        let conn = self.conn();
        let n: i64 = conn.query_row(
            &format!(
                "SELECT COUNT(*) FROM sandboxes WHERE state IN ({})",
                active_states_sql()
            ),
            [],
            |r| r.get(0),
        )?;
        Ok(n as u64)
    }

    /// Move a sandbox to `to`, checked against the lifecycle. Returns the
    /// updated record. `error` replaces the stored reason (None clears it
    /// unless the new state keeps it).
    pub fn transition(
        &self,
        id: &str,
        to: SandboxState,
        error: Option<&str>,
        now_ms: i64,
    ) -> Result<SandboxRecord> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let current: Option<String> = tx
            .query_row("SELECT state FROM sandboxes WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?;
        let current = current.ok_or_else(|| StoreError::NotFound(id.to_string()))?;
        let from: SandboxState = current
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("sandbox {id} has state {current:?}")))?;
        if !from.can_become(to) {
            return Err(StoreError::IllegalTransition {
                id: id.to_string(),
                from,
                to,
            });
        }
        tx.execute(
            "UPDATE sandboxes SET state = ?2, error = COALESCE(?3, error), updated_at = ?4 WHERE id = ?1",
            params![id, to.as_str(), error, now_ms],
        )?;
        let parts = tx.query_row(
            &format!("SELECT {COLUMNS} FROM sandboxes WHERE id = ?1"),
            [id],
            row_to_record,
        )?;
        tx.commit()?;
        finish(parts)
    }

    pub fn set_runtime_id(&self, id: &str, runtime_id: &str) -> Result<()> {
        self.conn().execute(
            "UPDATE sandboxes SET runtime_id = ?2 WHERE id = ?1",
            params![id, runtime_id],
        )?;
        Ok(())
    }

    /// Set a new expiry; only for sandboxes that are not on their way out.
    pub fn set_expires(
        &self,
        id: &str,
        expires_at_ms: i64,
        now_ms: i64,
    ) -> Result<Option<SandboxRecord>> {
        let conn = self.conn();
        let n = conn.execute(
            "UPDATE sandboxes SET expires_at = ?2, updated_at = ?3 WHERE id = ?1 \
             AND state IN ('creating', 'running', 'unhealthy')",
            params![id, expires_at_ms, now_ms],
        )?;
        drop(conn);
        if n == 0 {
            return Ok(None);
        }
        self.get_sandbox(id)
    }

    /// Append a lifecycle line to a sandbox's own log.
    pub fn add_event(&self, sandbox_id: &str, at_ms: i64, message: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO sandbox_events (sandbox_id, at, message) VALUES (?1, ?2, ?3)",
            params![sandbox_id, at_ms, message],
        )?;
        Ok(())
    }

    /// The last `limit` lifecycle lines of a sandbox, oldest first, as
    /// `(at_ms, message)`.
    pub fn events(&self, sandbox_id: &str, limit: usize) -> Result<Vec<(i64, String)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT at, message FROM sandbox_events WHERE sandbox_id = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![sandbox_id, limit as i64], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str, created: i64) -> SandboxRecord {
        SandboxRecord {
            id: id.to_string(),
            state: SandboxState::Creating,
            provider: "docker".into(),
            image: "python:3.12".into(),
            memory_mb: 512,
            vcpus: 1,
            owner_id: Some("alice".into()),
            template: None,
            network: "none".into(),
            metadata: BTreeMap::from([("purpose".to_string(), "test".to_string())]),
            env: BTreeMap::new(),
            created_at_ms: created,
            expires_at_ms: created + 1000,
            updated_at_ms: created,
            error: None,
            runtime_id: None,
            tenant: None,
            creator: None,
            pool: None,
        }
    }

    #[test]
    fn admit_get_list_roundtrip() {
        let s = Store::open_in_memory().unwrap();
        s.admit_sandbox(&rec("sb_a", 1), 10).unwrap();
        s.admit_sandbox(&rec("sb_b", 2), 10).unwrap();
        let got = s.get_sandbox("sb_a").unwrap().unwrap();
        assert_eq!(got.metadata.get("purpose").unwrap(), "test");
        assert_eq!(got.state, SandboxState::Creating);
        let list = s.list_sandboxes(&SandboxFilter::default()).unwrap();
        assert_eq!(
            list.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["sb_b", "sb_a"]
        );
        let f = SandboxFilter {
            labels: vec![("purpose".into(), "nope".into())],
            ..Default::default()
        };
        assert!(s.list_sandboxes(&f).unwrap().is_empty());
        assert!(s.get_sandbox("sb_zzz").unwrap().is_none());
    }

    #[test]
    fn admission_is_capped() {
        let s = Store::open_in_memory().unwrap();
        s.admit_sandbox(&rec("sb_1", 1), 2).unwrap();
        s.admit_sandbox(&rec("sb_2", 2), 2).unwrap();
        match s.admit_sandbox(&rec("sb_3", 3), 2) {
            Err(StoreError::CapacityExceeded { active: 2, max: 2 }) => {}
            other => panic!("expected capacity error, got {other:?}"),
        }
        s.transition("sb_1", SandboxState::Destroying, None, 5)
            .unwrap();
        s.transition("sb_1", SandboxState::Destroyed, None, 6)
            .unwrap();
        s.admit_sandbox(&rec("sb_3", 3), 2).unwrap();
    }

    #[test]
    fn transitions_follow_the_lifecycle() {
        let s = Store::open_in_memory().unwrap();
        s.admit_sandbox(&rec("sb_a", 1), 10).unwrap();
        let r = s
            .transition("sb_a", SandboxState::Running, None, 2)
            .unwrap();
        assert_eq!(r.state, SandboxState::Running);
        assert!(matches!(
            s.transition("sb_a", SandboxState::Creating, None, 3),
            Err(StoreError::IllegalTransition { .. })
        ));
        s.transition("sb_a", SandboxState::Destroying, None, 3)
            .unwrap();
        s.transition("sb_a", SandboxState::Destroyed, None, 4)
            .unwrap();
        assert!(matches!(
            s.transition("sb_a", SandboxState::Running, None, 5),
            Err(StoreError::IllegalTransition { .. })
        ));
        assert!(s.set_expires("sb_a", 99, 5).unwrap().is_none());
        assert!(matches!(
            s.transition("sb_nope", SandboxState::Running, None, 5),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn expiry_and_events() {
        let s = Store::open_in_memory().unwrap();
        s.admit_sandbox(&rec("sb_a", 1), 10).unwrap();
        s.transition("sb_a", SandboxState::Running, None, 2)
            .unwrap();
        assert!(s.list_expired(500).unwrap().is_empty());
        assert_eq!(s.list_expired(1001).unwrap(), vec!["sb_a".to_string()]);
        let r = s.set_expires("sb_a", 5000, 3).unwrap().unwrap();
        assert_eq!(r.expires_at_ms, 5000);
        for i in 0..5 {
            s.add_event("sb_a", i, &format!("line {i}")).unwrap();
        }
        let ev = s.events("sb_a", 2).unwrap();
        assert_eq!(
            ev,
            vec![(3, "line 3".to_string()), (4, "line 4".to_string())]
        );
    }

    #[test]
    fn meta_is_stable() {
        let s = Store::open_in_memory().unwrap();
        let a = s.meta_get_or_init("instance_id", || "one".into()).unwrap();
        let b = s.meta_get_or_init("instance_id", || "two".into()).unwrap();
        assert_eq!(a, "one");
        assert_eq!(b, "one");
    }
}
