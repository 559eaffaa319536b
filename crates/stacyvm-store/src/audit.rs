//! The audit log: append-only and hash-chained.
//!
//! Record `n` stores `prev_hash` (the hash of record `n-1`, 64 zeros for
//! the first) and `hash = sha256(prev_hash || canonical(record n))`, where
//! the canonical form is a JSON array of every field in a fixed order,
//! including the sequence number. The newest `(seq, hash)` is also kept in
//! `meta` (`audit_head`), updated in the same transaction, so dropping the
//! newest records is detected as well. [`Store::verify_audit`] walks the
//! chain and names the first record that does not fit.

use crate::{Result, Store, StoreError};
use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

pub(crate) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS audit_log (
    seq         INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    owner       TEXT,
    tenant      TEXT,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    code        TEXT,
    request_id  TEXT,
    client      TEXT,
    details     TEXT NOT NULL,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_at ON audit_log(at);
CREATE INDEX IF NOT EXISTS audit_log_action ON audit_log(action);
"#;

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HEAD_KEY: &str = "audit_head";

/// A record to append (the store assigns `seq` and the hashes).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NewAudit {
    pub at_ms: i64,
    pub actor: String,
    pub owner: Option<String>,
    pub tenant: Option<String>,
    pub action: String,
    pub target: String,
    /// `ok` or `error`.
    pub outcome: String,
    /// The API error code when `outcome` is `error`.
    pub code: Option<String>,
    pub request_id: Option<String>,
    pub client: Option<String>,
    /// A JSON object with what else is worth keeping (command line, paths…).
    pub details: String,
}

/// A stored record.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    pub seq: i64,
    pub entry: NewAudit,
    pub prev_hash: String,
    pub hash: String,
}

/// Filters of [`Store::query_audit`]; every given field must match.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Exact action, or a prefix when it ends with `*` (`sandbox.*`).
    pub action: Option<String>,
    pub actor: Option<String>,
    pub owner: Option<String>,
    pub target: Option<String>,
    pub outcome: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Only records after this sequence number (paging cursor).
    pub after_seq: Option<i64>,
    pub limit: usize,
}

/// Result of [`Store::verify_audit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditVerify {
    pub ok: bool,
    pub records: u64,
    /// Sequence number of the first record that is missing or altered.
    pub first_bad: Option<i64>,
    pub reason: Option<String>,
}

pub fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// The canonical bytes of a record: a JSON array in a fixed field order.
fn canonical(seq: i64, e: &NewAudit) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!([
        seq,
        e.at_ms,
        e.actor,
        e.owner,
        e.tenant,
        e.action,
        e.target,
        e.outcome,
        e.code,
        e.request_id,
        e.client,
        e.details,
    ]))
    .unwrap_or_default()
}

fn chain_hash(prev_hash: &str, seq: i64, e: &NewAudit) -> String {
    let mut h = Sha256::new();
    h.update(prev_hash.as_bytes());
    h.update(canonical(seq, e));
    hex(&h.finalize())
}

const AUDIT_COLUMNS: &str = "seq, at, actor, owner, tenant, action, target, outcome, code, \
     request_id, client, details, prev_hash, hash";

fn audit_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRecord> {
    Ok(AuditRecord {
        seq: r.get(0)?,
        entry: NewAudit {
            at_ms: r.get(1)?,
            actor: r.get(2)?,
            owner: r.get(3)?,
            tenant: r.get(4)?,
            action: r.get(5)?,
            target: r.get(6)?,
            outcome: r.get(7)?,
            code: r.get(8)?,
            request_id: r.get(9)?,
            client: r.get(10)?,
            details: r.get(11)?,
        },
        prev_hash: r.get(12)?,
        hash: r.get(13)?,
    })
}

fn head(conn: &Connection) -> Result<Option<(i64, String)>> {
    let v: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [HEAD_KEY], |r| {
            r.get(0)
        })
        .optional()?;
    let Some(v) = v else { return Ok(None) };
    let (seq, hash) = v
        .split_once(':')
        .ok_or_else(|| StoreError::Corrupt(format!("audit head {v:?}")))?;
    let seq = seq
        .parse()
        .map_err(|_| StoreError::Corrupt(format!("audit head {v:?}")))?;
    Ok(Some((seq, hash.to_string())))
}

impl Store {
    /// Append records in one transaction; returns their sequence numbers.
    pub fn append_audit(&self, batch: &[NewAudit]) -> Result<Vec<i64>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let (mut seq, mut prev) = match head(&tx)? {
            Some(h) => h,
            None => {
                // A log written before the head was kept (or none at all).
                let last: Option<(i64, String)> = tx
                    .query_row(
                        "SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1",
                        [],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                last.unwrap_or((0, GENESIS.to_string()))
            }
        };
        let mut out = Vec::with_capacity(batch.len());
        {
            let mut stmt = tx.prepare(&format!(
                "INSERT INTO audit_log ({AUDIT_COLUMNS}) VALUES \
                 (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"
            ))?;
            for e in batch {
                seq += 1;
                let hash = chain_hash(&prev, seq, e);
                stmt.execute(params![
                    seq,
                    e.at_ms,
                    e.actor,
                    e.owner,
                    e.tenant,
                    e.action,
                    e.target,
                    e.outcome,
                    e.code,
                    e.request_id,
                    e.client,
                    e.details,
                    prev,
                    hash
                ])?;
                out.push(seq);
                prev = hash;
            }
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) \
             ON CONFLICT(key) DO UPDATE SET value = ?2",
            params![HEAD_KEY, format!("{seq}:{prev}")],
        )?;
        tx.commit()?;
        Ok(out)
    }

    /// Records matching `f`, oldest first, at most `f.limit`.
    pub fn query_audit(&self, f: &AuditFilter) -> Result<Vec<AuditRecord>> {
        let conn = self.conn();
        let mut sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_log WHERE 1=1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        let mut push = |sql: &mut String, cond: &str, v: rusqlite::types::Value| {
            args.push(v);
            sql.push_str(&format!(" AND {cond} ?{}", args.len()));
        };
        if let Some(a) = &f.action {
            match a.strip_suffix('*') {
                Some(prefix) => {
                    let escaped = prefix
                        .replace('\\', "\\\\")
                        .replace('%', "\\%")
                        .replace('_', "\\_");
                    push(&mut sql, "action LIKE", format!("{escaped}%").into());
                    sql.push_str(" ESCAPE '\\'");
                }
                None => push(&mut sql, "action =", a.clone().into()),
            }
        }
        if let Some(v) = &f.actor {
            push(&mut sql, "actor =", v.clone().into());
        }
        if let Some(v) = &f.owner {
            push(&mut sql, "owner =", v.clone().into());
        }
        if let Some(v) = &f.target {
            push(&mut sql, "target =", v.clone().into());
        }
        if let Some(v) = &f.outcome {
            push(&mut sql, "outcome =", v.clone().into());
        }
        if let Some(v) = f.since_ms {
            push(&mut sql, "at >=", v.into());
        }
        if let Some(v) = f.until_ms {
            push(&mut sql, "at <", v.into());
        }
        if let Some(v) = f.after_seq {
            push(&mut sql, "seq >", v.into());
        }
        sql.push_str(&format!(" ORDER BY seq LIMIT {}", f.limit.max(1)));
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), audit_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    /// Walk the whole chain. Any record changed, removed or inserted after
    /// the fact makes it fail and is named in `first_bad`.
    pub fn verify_audit(&self) -> Result<AuditVerify> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {AUDIT_COLUMNS} FROM audit_log ORDER BY seq"
        ))?;
        let mut rows = stmt.query([])?;
        let mut expected = 1i64;
        let mut prev = GENESIS.to_string();
        let mut records = 0u64;
        let mut bad: Option<(i64, String)> = None;
        while let Some(row) = rows.next()? {
            records += 1;
            if bad.is_some() {
                continue;
            }
            let r = audit_row(row)?;
            if r.seq != expected {
                bad = Some(if r.seq > expected {
                    (expected, format!("record {expected} is missing"))
                } else {
                    (r.seq, format!("record {} is out of order", r.seq))
                });
                continue;
            }
            if r.prev_hash != prev {
                bad = Some((
                    r.seq,
                    format!(
                        "record {} does not follow record {}: its prev_hash differs",
                        r.seq,
                        r.seq - 1
                    ),
                ));
                continue;
            }
            if chain_hash(&prev, r.seq, &r.entry) != r.hash {
                bad = Some((
                    r.seq,
                    format!(
                        "record {} was changed: its content does not match its hash",
                        r.seq
                    ),
                ));
                continue;
            }
            prev = r.hash;
            expected += 1;
        }
        drop(rows);
        drop(stmt);
        if bad.is_none() {
            let last = expected - 1;
            if let Some((head_seq, head_hash)) = head(&conn)? {
                if head_seq > last {
                    bad = Some((
                        last + 1,
                        format!("records {} to {head_seq} are missing", last + 1),
                    ));
                } else if head_seq == last && head_hash != prev {
                    bad = Some((last, format!("record {last} does not match the chain head")));
                }
            }
        }
        Ok(AuditVerify {
            ok: bad.is_none(),
            records,
            first_bad: bad.as_ref().map(|b| b.0),
            reason: bad.map(|b| b.1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: i64) -> NewAudit {
        NewAudit {
            at_ms: 1000 + i,
            actor: "admin".into(),
            owner: Some("alice".into()),
            tenant: None,
            action: if i % 2 == 0 {
                "sandbox.create".into()
            } else {
                "sandbox.exec".into()
            },
            target: format!("sb_{i}"),
            outcome: "ok".into(),
            code: None,
            request_id: Some(format!("r{i}")),
            client: Some("127.0.0.1".into()),
            details: "{}".into(),
        }
    }

    fn filled(n: i64) -> Store {
        let s = Store::open_in_memory().unwrap();
        let batch: Vec<_> = (0..n).map(ev).collect();
        assert_eq!(s.append_audit(&batch[..3]).unwrap(), vec![1, 2, 3]);
        s.append_audit(&batch[3..]).unwrap();
        s
    }

    #[test]
    fn chain_verifies_and_filters_work() {
        let s = filled(10);
        let v = s.verify_audit().unwrap();
        assert_eq!(
            v,
            AuditVerify {
                ok: true,
                records: 10,
                first_bad: None,
                reason: None
            }
        );
        let f = AuditFilter {
            action: Some("sandbox.exec".into()),
            limit: 100,
            ..Default::default()
        };
        assert_eq!(s.query_audit(&f).unwrap().len(), 5);
        let f = AuditFilter {
            action: Some("sandbox.*".into()),
            after_seq: Some(8),
            limit: 100,
            ..Default::default()
        };
        let got: Vec<_> = s.query_audit(&f).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(got, [9, 10]);
        let f = AuditFilter {
            since_ms: Some(1003),
            until_ms: Some(1005),
            limit: 100,
            ..Default::default()
        };
        assert_eq!(s.query_audit(&f).unwrap().len(), 2);
    }

    #[test]
    fn tampering_is_detected() {
        let s = filled(6);
        s.conn()
            .execute("UPDATE audit_log SET target = 'sb_x' WHERE seq = 4", [])
            .unwrap();
        let v = s.verify_audit().unwrap();
        assert!(!v.ok);
        assert_eq!(v.first_bad, Some(4));

        let s = filled(6);
        s.conn()
            .execute("DELETE FROM audit_log WHERE seq = 3", [])
            .unwrap();
        assert_eq!(s.verify_audit().unwrap().first_bad, Some(3));

        let s = filled(6);
        s.conn()
            .execute("DELETE FROM audit_log WHERE seq = 6", [])
            .unwrap();
        assert_eq!(s.verify_audit().unwrap().first_bad, Some(6));
        // appending after the tampering keeps it detectable
        s.append_audit(&[ev(7)]).unwrap();
        assert_eq!(s.verify_audit().unwrap().first_bad, Some(6));
    }
}
