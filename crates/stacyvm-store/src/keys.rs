//! API keys. Only a SHA-256 digest of each secret is stored; the secret
//! itself is shown once, when the key is created.

use crate::{Result, Store};
use rusqlite::{params, OptionalExtension};

pub(crate) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS api_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    scope       TEXT NOT NULL,
    tenant      TEXT,
    rate_limit  REAL,
    hash        TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);
"#;

/// One API key as stored (never the secret).
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    pub id: String,
    /// The identity requests with this key act as.
    pub name: String,
    /// `admin`, `operator`, `api` or `viewer`.
    pub scope: String,
    pub tenant: Option<String>,
    /// Requests per second (token bucket); `None` is unlimited.
    pub rate_limit: Option<f64>,
    /// Hex SHA-256 of the secret.
    pub hash: String,
    /// The first characters of the secret, to recognise it in a list.
    pub prefix: String,
    pub created_at_ms: i64,
    pub revoked_at_ms: Option<i64>,
}

const KEY_COLUMNS: &str =
    "id, name, scope, tenant, rate_limit, hash, prefix, created_at, revoked_at";

fn key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<KeyRecord> {
    Ok(KeyRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        scope: r.get(2)?,
        tenant: r.get(3)?,
        rate_limit: r.get(4)?,
        hash: r.get(5)?,
        prefix: r.get(6)?,
        created_at_ms: r.get(7)?,
        revoked_at_ms: r.get(8)?,
    })
}

impl Store {
    pub fn insert_key(&self, k: &KeyRecord) -> Result<()> {
        self.conn().execute(
            &format!(
                "INSERT INTO api_keys ({KEY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
            ),
            params![
                k.id,
                k.name,
                k.scope,
                k.tenant,
                k.rate_limit,
                k.hash,
                k.prefix,
                k.created_at_ms,
                k.revoked_at_ms
            ],
        )?;
        Ok(())
    }

    /// Keys that are not revoked, oldest first.
    pub fn list_keys(&self) -> Result<Vec<KeyRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE revoked_at IS NULL ORDER BY created_at, id"
        ))?;
        let rows = stmt.query_map([], key_row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn get_key(&self, id: &str) -> Result<Option<KeyRecord>> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?1"),
                [id],
                key_row,
            )
            .optional()?)
    }

    /// Revoke a key; the revoked record, or `None` when no live key has that id.
    pub fn revoke_key(&self, id: &str, now_ms: i64) -> Result<Option<KeyRecord>> {
        let n = self.conn().execute(
            "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![id, now_ms],
        )?;
        if n == 0 {
            return Ok(None);
        }
        self.get_key(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_revoke() {
        let s = Store::open_in_memory().unwrap();
        let k = KeyRecord {
            id: "key_1".into(),
            name: "ci".into(),
            scope: "api".into(),
            tenant: Some("acme".into()),
            rate_limit: Some(5.0),
            hash: "ab".repeat(32),
            prefix: "sk_abcd".into(),
            created_at_ms: 1,
            revoked_at_ms: None,
        };
        s.insert_key(&k).unwrap();
        assert_eq!(s.list_keys().unwrap(), vec![k.clone()]);
        let r = s.revoke_key("key_1", 2).unwrap().unwrap();
        assert_eq!(r.revoked_at_ms, Some(2));
        assert!(s.list_keys().unwrap().is_empty());
        assert!(s.revoke_key("key_1", 3).unwrap().is_none());
    }
}
