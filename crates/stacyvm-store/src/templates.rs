//! Templates: named sandbox recipes. The store keeps each as a JSON
//! document; the control plane owns its shape.

use crate::{Result, Store, StoreError};
use rusqlite::{params, OptionalExtension};

pub(crate) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS templates (
    name        TEXT PRIMARY KEY,
    spec        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
"#;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRow {
    pub name: String,
    /// The template as JSON.
    pub spec: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TemplateRow> {
    Ok(TemplateRow {
        name: r.get(0)?,
        spec: r.get(1)?,
        created_at_ms: r.get(2)?,
        updated_at_ms: r.get(3)?,
    })
}

impl Store {
    /// Store a new template; [`StoreError::Conflict`] when the name is taken.
    pub fn insert_template(&self, name: &str, spec: &str, now_ms: i64) -> Result<TemplateRow> {
        let n = self.conn().execute(
            "INSERT INTO templates (name, spec, created_at, updated_at) VALUES (?1, ?2, ?3, ?3) \
             ON CONFLICT(name) DO NOTHING",
            params![name, spec, now_ms],
        )?;
        if n == 0 {
            return Err(StoreError::Conflict(format!(
                "template {name} already exists"
            )));
        }
        Ok(TemplateRow {
            name: name.to_string(),
            spec: spec.to_string(),
            created_at_ms: now_ms,
            updated_at_ms: now_ms,
        })
    }

    /// Replace a template; `None` when it does not exist.
    pub fn update_template(
        &self,
        name: &str,
        spec: &str,
        now_ms: i64,
    ) -> Result<Option<TemplateRow>> {
        let n = self.conn().execute(
            "UPDATE templates SET spec = ?2, updated_at = ?3 WHERE name = ?1",
            params![name, spec, now_ms],
        )?;
        if n == 0 {
            return Ok(None);
        }
        self.get_template(name)
    }

    pub fn get_template(&self, name: &str) -> Result<Option<TemplateRow>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT name, spec, created_at, updated_at FROM templates WHERE name = ?1",
                [name],
                row,
            )
            .optional()?)
    }

    /// Every template, sorted by name.
    pub fn list_templates(&self) -> Result<Vec<TemplateRow>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT name, spec, created_at, updated_at FROM templates ORDER BY name")?;
        let rows = stmt.query_map([], row)?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    pub fn delete_template(&self, name: &str) -> Result<bool> {
        let n = self
            .conn()
            .execute("DELETE FROM templates WHERE name = ?1", [name])?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        let s = Store::open_in_memory().unwrap();
        s.insert_template("b", "{}", 1).unwrap();
        s.insert_template("a", "{}", 1).unwrap();
        assert!(matches!(
            s.insert_template("a", "{}", 2),
            Err(StoreError::Conflict(_))
        ));
        let names: Vec<_> = s
            .list_templates()
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        let u = s.update_template("a", "{\"x\":1}", 5).unwrap().unwrap();
        assert_eq!((u.created_at_ms, u.updated_at_ms), (1, 5));
        assert!(s.update_template("zz", "{}", 5).unwrap().is_none());
        assert!(s.delete_template("a").unwrap());
        assert!(s.get_template("a").unwrap().is_none());
    }
}
