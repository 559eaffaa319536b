//! Quotas per owner and per API key identity, and the admission decision
//! that reads them.
//!
//! One table holds every quota, keyed by a *subject* name. At admission a
//! sandbox is checked against two subjects: its owner (counting the active
//! sandboxes with that `owner_id`) and the identity of the key that creates
//! it (counting the active sandboxes with that `creator`). Both checks and
//! the global cap run inside the caller's transaction, so a decision and
//! the insert it allows are one atomic step.

use crate::{
    active_states_sql, finish, insert_sandbox, row_to_record, to_json, Result, SandboxRecord,
    Store, StoreError, COLUMNS,
};
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::BTreeMap;

pub(crate) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS quotas (
    owner               TEXT PRIMARY KEY,
    max_sandboxes       INTEGER,
    max_memory_mb       INTEGER,
    max_vcpus           INTEGER,
    max_ttl_ms          INTEGER,
    max_exec_timeout_ms INTEGER,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
);
"#;

/// Limits of one subject; `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaLimits {
    pub max_sandboxes: Option<u64>,
    pub max_memory_mb: Option<u64>,
    pub max_vcpus: Option<u64>,
    pub max_ttl_ms: Option<i64>,
    pub max_exec_timeout_ms: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaRecord {
    /// The subject: an owner id or an API key identity.
    pub owner: String,
    pub limits: QuotaLimits,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// Active resources of one subject.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub sandboxes: u64,
    pub memory_mb: u64,
    pub vcpus: u64,
}

/// One subject checked at admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectUsage {
    /// `owner` or `key`.
    pub kind: &'static str,
    pub subject: String,
    pub usage: Usage,
    pub limits: Option<QuotaLimits>,
}

/// Everything an admission decision looked at.
#[derive(Debug)]
pub struct AdmissionReport {
    pub active: u64,
    pub max_active: u64,
    pub owner: Option<SubjectUsage>,
    pub creator: Option<SubjectUsage>,
    /// Why the sandbox would be refused; `None` when it is admitted.
    pub refusal: Option<StoreError>,
}

/// Render milliseconds like a Go duration (`1h30m0s`, `45s`, `1.5s`).
pub fn fmt_ms(ms: i64) -> String {
    if ms <= 0 {
        return "0s".into();
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let secs = if rest % 1000 == 0 {
        format!("{}s", rest / 1000)
    } else {
        format!("{}s", rest as f64 / 1000.0)
    };
    if h > 0 {
        format!("{h}h{m}m{secs}")
    } else if m > 0 {
        format!("{m}m{secs}")
    } else {
        secs
    }
}

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|n| n.max(0) as u64)
}

fn quota_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<QuotaRecord> {
    Ok(QuotaRecord {
        owner: row.get(0)?,
        limits: QuotaLimits {
            max_sandboxes: opt_u64(row.get(1)?),
            max_memory_mb: opt_u64(row.get(2)?),
            max_vcpus: opt_u64(row.get(3)?),
            max_ttl_ms: row.get(4)?,
            max_exec_timeout_ms: row.get(5)?,
        },
        created_at_ms: row.get(6)?,
        updated_at_ms: row.get(7)?,
    })
}

const QUOTA_COLUMNS: &str =
    "owner, max_sandboxes, max_memory_mb, max_vcpus, max_ttl_ms, max_exec_timeout_ms, created_at, updated_at";

fn get_quota(conn: &Connection, owner: &str) -> Result<Option<QuotaRecord>> {
    Ok(conn
        .query_row(
            &format!("SELECT {QUOTA_COLUMNS} FROM quotas WHERE owner = ?1"),
            [owner],
            quota_row,
        )
        .optional()?)
}

/// Active sandboxes whose `column` (`owner_id` or `creator`) is `subject`.
fn usage_of(conn: &Connection, column: &str, subject: &str) -> Result<Usage> {
    let (n, mem, cpu): (i64, i64, i64) = conn.query_row(
        &format!(
            "SELECT COUNT(*), COALESCE(SUM(memory_mb), 0), COALESCE(SUM(vcpus), 0) \
             FROM sandboxes WHERE state IN ({}) AND {column} = ?1",
            active_states_sql()
        ),
        [subject],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )?;
    Ok(Usage {
        sandboxes: n as u64,
        memory_mb: mem as u64,
        vcpus: cpu as u64,
    })
}

/// Why `rec` would pass `limits` given `usage` (None = it fits). `rec` is
/// never part of `usage` (a pooled sandbox being claimed belongs to the
/// pool's owner until then).
fn over_limit(
    kind: &str,
    subject: &str,
    limits: &QuotaLimits,
    usage: &Usage,
    rec: &SandboxRecord,
) -> Option<String> {
    let who = format!("{kind} {subject}");
    if let Some(max) = limits.max_sandboxes {
        if usage.sandboxes + 1 > max {
            return Some(format!(
                "quota exceeded for {who}: max_sandboxes is {max} and {} are active",
                usage.sandboxes
            ));
        }
    }
    if let Some(max) = limits.max_memory_mb {
        if usage.memory_mb + rec.memory_mb > max {
            return Some(format!(
                "quota exceeded for {who}: max_memory_mb is {max}, {} MB are in use and {} MB were asked for",
                usage.memory_mb, rec.memory_mb
            ));
        }
    }
    if let Some(max) = limits.max_vcpus {
        if usage.vcpus + rec.vcpus as u64 > max {
            return Some(format!(
                "quota exceeded for {who}: max_vcpus is {max}, {} are in use and {} were asked for",
                usage.vcpus, rec.vcpus
            ));
        }
    }
    if let Some(max) = limits.max_ttl_ms {
        let ttl = rec.expires_at_ms - rec.created_at_ms;
        if ttl > max {
            return Some(format!(
                "quota exceeded for {who}: ttl {} exceeds max_ttl {}",
                fmt_ms(ttl),
                fmt_ms(max)
            ));
        }
    }
    None
}

/// The admission decision for `rec` inside the caller's transaction.
/// `claim`: `rec` is a pooled sandbox being handed to a new owner; it
/// already counts against the global cap.
pub(crate) fn evaluate(
    tx: &Connection,
    rec: &SandboxRecord,
    max_active: u64,
    claim: bool,
) -> Result<AdmissionReport> {
    let active: i64 = tx.query_row(
        &format!(
            "SELECT COUNT(*) FROM sandboxes WHERE state IN ({})",
            active_states_sql()
        ),
        [],
        |r| r.get(0),
    )?;
    let active = active as u64;
    let mut report = AdmissionReport {
        active,
        max_active,
        owner: None,
        creator: None,
        refusal: None,
    };
    if !claim && active >= max_active {
        report.refusal = Some(StoreError::CapacityExceeded {
            active,
            max: max_active,
        });
    }
    let subjects = [
        ("owner", "owner_id", rec.owner_id.as_deref()),
        ("key", "creator", rec.creator.as_deref()),
    ];
    for (kind, column, subject) in subjects {
        let Some(subject) = subject else { continue };
        let usage = usage_of(tx, column, subject)?;
        let limits = get_quota(tx, subject)?.map(|q| q.limits);
        if report.refusal.is_none() {
            if let Some(l) = &limits {
                if let Some(why) = over_limit(kind, subject, l, &usage, rec) {
                    report.refusal = Some(StoreError::QuotaExceeded(why));
                }
            }
        }
        let su = SubjectUsage {
            kind: if kind == "owner" { "owner" } else { "key" },
            subject: subject.to_string(),
            usage,
            limits,
        };
        if kind == "owner" {
            report.owner = Some(su);
        } else {
            report.creator = Some(su);
        }
    }
    Ok(report)
}

/// What a claimed pooled sandbox becomes.
#[derive(Debug, Clone)]
pub struct Claim {
    pub owner_id: Option<String>,
    pub tenant: Option<String>,
    pub creator: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub expires_at_ms: i64,
    pub now_ms: i64,
}

impl Store {
    pub fn get_quota(&self, owner: &str) -> Result<Option<QuotaRecord>> {
        get_quota(&self.conn(), owner)
    }

    /// Every quota, sorted by subject.
    pub fn list_quotas(&self) -> Result<Vec<QuotaRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {QUOTA_COLUMNS} FROM quotas ORDER BY owner"
        ))?;
        let rows = stmt.query_map([], quota_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Insert or replace the quota of `owner`; returns the stored record
    /// and whether it existed before.
    pub fn put_quota(
        &self,
        owner: &str,
        limits: &QuotaLimits,
        now_ms: i64,
    ) -> Result<(QuotaRecord, bool)> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let existed = get_quota(&tx, owner)?.is_some();
        let as_i64 = |v: Option<u64>| v.map(|n| n.min(i64::MAX as u64) as i64);
        tx.execute(
            "INSERT INTO quotas (owner, max_sandboxes, max_memory_mb, max_vcpus, max_ttl_ms, \
             max_exec_timeout_ms, created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7) \
             ON CONFLICT(owner) DO UPDATE SET max_sandboxes = ?2, max_memory_mb = ?3, \
             max_vcpus = ?4, max_ttl_ms = ?5, max_exec_timeout_ms = ?6, updated_at = ?7",
            params![
                owner,
                as_i64(limits.max_sandboxes),
                as_i64(limits.max_memory_mb),
                as_i64(limits.max_vcpus),
                limits.max_ttl_ms,
                limits.max_exec_timeout_ms,
                now_ms
            ],
        )?;
        let rec = get_quota(&tx, owner)?
            .ok_or_else(|| StoreError::Corrupt(format!("quota {owner} vanished")))?;
        tx.commit()?;
        Ok((rec, existed))
    }

    /// Remove the quota of `owner`; false when there was none.
    pub fn delete_quota(&self, owner: &str) -> Result<bool> {
        let n = self
            .conn()
            .execute("DELETE FROM quotas WHERE owner = ?1", [owner])?;
        Ok(n > 0)
    }

    /// Active usage of a subject as owner (`owner_id`) and as key identity
    /// (`creator`).
    pub fn usage(&self, subject: &str) -> Result<(Usage, Usage)> {
        let conn = self.conn();
        Ok((
            usage_of(&conn, "owner_id", subject)?,
            usage_of(&conn, "creator", subject)?,
        ))
    }

    /// Hand the oldest ready sandbox of `template`'s warm pool to a new
    /// owner, in one transaction that also checks the new owner's and key's
    /// quotas. `Ok(None)`: the pool has no ready sandbox.
    pub fn claim_pooled(
        &self,
        template: &str,
        claim: &Claim,
        max_active: u64,
        accept: impl Fn(&SandboxRecord) -> bool,
    ) -> Result<Option<SandboxRecord>> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let candidates = {
            let mut stmt = tx.prepare(&format!(
                "SELECT {COLUMNS} FROM sandboxes WHERE pool = ?1 AND pool_ready = 1 \
                 AND state = 'running' ORDER BY created_at, id"
            ))?;
            let rows = stmt.query_map([template], row_to_record)?;
            rows.map(|r| finish(r?)).collect::<Result<Vec<_>>>()?
        };
        let Some(mut rec) = candidates.into_iter().find(|r| accept(r)) else {
            return Ok(None);
        };
        rec.owner_id = claim.owner_id.clone();
        rec.tenant = claim.tenant.clone();
        rec.creator = claim.creator.clone();
        rec.metadata = claim.metadata.clone();
        rec.created_at_ms = claim.now_ms;
        rec.expires_at_ms = claim.expires_at_ms;
        rec.updated_at_ms = claim.now_ms;
        rec.pool = None;
        let report = evaluate(&tx, &rec, max_active, true)?;
        if let Some(refusal) = report.refusal {
            return Err(refusal);
        }
        tx.execute(
            "UPDATE sandboxes SET owner_id = ?2, tenant = ?3, creator = ?4, metadata = ?5, \
             created_at = ?6, expires_at = ?7, updated_at = ?6, pool = NULL, pool_ready = 0 \
             WHERE id = ?1",
            params![
                rec.id,
                rec.owner_id,
                rec.tenant,
                rec.creator,
                to_json(&rec.metadata),
                rec.created_at_ms,
                rec.expires_at_ms
            ],
        )?;
        tx.commit()?;
        Ok(Some(rec))
    }

    /// Mark a pooled sandbox as ready to be claimed (its setup is done).
    /// False when it is no longer in that pool or not running.
    pub fn mark_pool_ready(&self, id: &str, template: &str) -> Result<bool> {
        let n = self.conn().execute(
            "UPDATE sandboxes SET pool_ready = 1 WHERE id = ?1 AND pool = ?2 AND state = 'running'",
            params![id, template],
        )?;
        Ok(n > 0)
    }

    /// Active pooled sandboxes: `(id, template, ready)`.
    pub fn pooled(&self) -> Result<Vec<(String, String, bool)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT id, pool, pool_ready FROM sandboxes WHERE pool IS NOT NULL \
             AND state IN ({}) ORDER BY created_at",
            active_states_sql()
        ))?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)? != 0,
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Store a sandbox without any admission check (tests).
    #[doc(hidden)]
    pub fn insert_unchecked(&self, rec: &SandboxRecord) -> Result<()> {
        insert_sandbox(&self.conn(), rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SandboxState;

    fn rec(id: &str, owner: &str, creator: Option<&str>) -> SandboxRecord {
        SandboxRecord {
            id: id.to_string(),
            state: SandboxState::Creating,
            provider: "native".into(),
            image: "img".into(),
            memory_mb: 256,
            vcpus: 1,
            owner_id: Some(owner.to_string()),
            template: None,
            network: "none".into(),
            metadata: BTreeMap::new(),
            env: BTreeMap::new(),
            created_at_ms: 1000,
            expires_at_ms: 1000 + 60_000,
            updated_at_ms: 1000,
            error: None,
            runtime_id: None,
            tenant: None,
            creator: creator.map(str::to_string),
            pool: None,
        }
    }

    #[test]
    fn owner_and_key_quotas_are_enforced() {
        let s = Store::open_in_memory().unwrap();
        let limits = QuotaLimits {
            max_sandboxes: Some(2),
            ..Default::default()
        };
        s.put_quota("alice", &limits, 1).unwrap();
        s.admit_sandbox(&rec("sb_1", "alice", None), 100).unwrap();
        s.admit_sandbox(&rec("sb_2", "alice", None), 100).unwrap();
        let e = s
            .admit_sandbox(&rec("sb_3", "alice", None), 100)
            .unwrap_err();
        assert!(
            matches!(&e, StoreError::QuotaExceeded(m) if m.contains("max_sandboxes is 2")),
            "{e}"
        );
        s.admit_sandbox(&rec("sb_4", "bob", None), 100).unwrap();
        // a key identity's quota counts what that key created, whoever owns it
        s.put_quota(
            "ci-key",
            &QuotaLimits {
                max_memory_mb: Some(300),
                ..Default::default()
            },
            1,
        )
        .unwrap();
        s.admit_sandbox(&rec("sb_5", "carol", Some("ci-key")), 100)
            .unwrap();
        let e = s
            .admit_sandbox(&rec("sb_6", "dave", Some("ci-key")), 100)
            .unwrap_err();
        assert!(e.to_string().contains("key ci-key"), "{e}");
        let r = s.check_admission(&rec("sb_7", "alice", None), 100).unwrap();
        assert_eq!(r.owner.as_ref().unwrap().usage.sandboxes, 2);
        assert!(r.refusal.is_some());
        // ttl limit
        s.put_quota(
            "erin",
            &QuotaLimits {
                max_ttl_ms: Some(30_000),
                ..Default::default()
            },
            1,
        )
        .unwrap();
        let e = s
            .admit_sandbox(&rec("sb_8", "erin", None), 100)
            .unwrap_err();
        assert!(e.to_string().contains("max_ttl 30s"), "{e}");
        assert!(s.delete_quota("erin").unwrap());
        assert!(!s.delete_quota("erin").unwrap());
        s.admit_sandbox(&rec("sb_8", "erin", None), 100).unwrap();
        assert_eq!(s.list_quotas().unwrap().len(), 2);
    }

    #[test]
    fn claims_move_a_ready_pooled_sandbox() {
        let s = Store::open_in_memory().unwrap();
        let mut p = rec("sb_p1", "system:pool:t", None);
        p.pool = Some("t".into());
        s.admit_sandbox(&p, 10).unwrap();
        s.transition("sb_p1", SandboxState::Running, None, 2)
            .unwrap();
        let claim = Claim {
            owner_id: Some("alice".into()),
            tenant: Some("acme".into()),
            creator: Some("k".into()),
            metadata: BTreeMap::new(),
            expires_at_ms: 9_000,
            now_ms: 5_000,
        };
        // not ready yet
        assert!(s.claim_pooled("t", &claim, 10, |_| true).unwrap().is_none());
        assert!(s.mark_pool_ready("sb_p1", "t").unwrap());
        assert_eq!(
            s.pooled().unwrap(),
            vec![("sb_p1".into(), "t".into(), true)]
        );
        // hidden from lists until claimed
        assert!(s
            .list_sandboxes(&crate::SandboxFilter::default())
            .unwrap()
            .is_empty());
        let got = s.claim_pooled("t", &claim, 10, |_| true).unwrap().unwrap();
        assert_eq!(got.owner_id.as_deref(), Some("alice"));
        assert_eq!(got.tenant.as_deref(), Some("acme"));
        assert_eq!(got.pool, None);
        let again = s.get_sandbox("sb_p1").unwrap().unwrap();
        assert_eq!(again, got);
        assert!(s.claim_pooled("t", &claim, 10, |_| true).unwrap().is_none());
        assert_eq!(
            s.list_sandboxes(&crate::SandboxFilter {
                tenant: Some("acme".into()),
                ..Default::default()
            })
            .unwrap()
            .len(),
            1
        );
    }

    #[test]
    fn durations_render_like_go() {
        assert_eq!(fmt_ms(3_600_000), "1h0m0s");
        assert_eq!(fmt_ms(90_000), "1m30s");
        assert_eq!(fmt_ms(1_500), "1.5s");
        assert_eq!(fmt_ms(0), "0s");
    }
}
