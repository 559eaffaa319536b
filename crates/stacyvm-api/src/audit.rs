//! The audit log (API.md §9, admin scope): query, export, verify.

use crate::error::{ApiError, ApiResult};
use crate::extract::Query;
use crate::AppState;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use stacyvm_core::clock::{parse_rfc3339, rfc3339_ms};
use stacyvm_store::{AuditFilter, AuditRecord};

/// Page size of the JSON answer unless `limit` says otherwise.
const DEFAULT_LIMIT: usize = 100;
const MAX_JSON_LIMIT: usize = 1000;
/// Most records in one `jsonl`/`csv` export.
const MAX_EXPORT: usize = 1_000_000;

#[derive(Deserialize, Default)]
pub struct AuditQuery {
    action: Option<String>,
    actor: Option<String>,
    owner: Option<String>,
    target: Option<String>,
    since: Option<String>,
    until: Option<String>,
    outcome: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
    format: Option<String>,
}

fn time(name: &str, v: Option<String>) -> ApiResult<Option<i64>> {
    match v.filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => parse_rfc3339(&s).map(Some).ok_or_else(|| {
            ApiError::invalid(format!("{name} must be an RFC 3339 time, not {s:?}"))
        }),
    }
}

fn record_json(r: &AuditRecord) -> Value {
    let e = &r.entry;
    let details: Value =
        serde_json::from_str(&e.details).unwrap_or(Value::String(e.details.clone()));
    json!({
        "id": r.seq,
        "time": rfc3339_ms(e.at_ms),
        "actor": e.actor,
        "owner": e.owner,
        "tenant": e.tenant,
        "action": e.action,
        "target": e.target,
        "outcome": e.outcome,
        "code": e.code,
        "request_id": e.request_id,
        "client": e.client,
        "details": details,
        "prev_hash": r.prev_hash,
        "hash": r.hash,
    })
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

const CSV_HEADER: &str =
    "id,time,actor,owner,tenant,action,target,outcome,code,request_id,client,details,prev_hash,hash\n";

fn csv_row(r: &AuditRecord) -> String {
    let e = &r.entry;
    let o = |v: &Option<String>| v.clone().unwrap_or_default();
    let fields = [
        r.seq.to_string(),
        rfc3339_ms(e.at_ms),
        e.actor.clone(),
        o(&e.owner),
        o(&e.tenant),
        e.action.clone(),
        e.target.clone(),
        e.outcome.clone(),
        o(&e.code),
        o(&e.request_id),
        o(&e.client),
        e.details.clone(),
        r.prev_hash.clone(),
        r.hash.clone(),
    ];
    let mut line = fields
        .iter()
        .map(|f| csv_field(f))
        .collect::<Vec<_>>()
        .join(",");
    line.push('\n');
    line
}

pub async fn query(State(s): State<AppState>, Query(q): Query<AuditQuery>) -> ApiResult<Response> {
    let format = q
        .format
        .clone()
        .filter(|f| !f.is_empty())
        .unwrap_or_else(|| "json".into());
    let export = match format.as_str() {
        "json" => false,
        "jsonl" | "csv" => true,
        other => {
            return Err(ApiError::invalid(format!(
                "format must be json, jsonl or csv, not {other:?}"
            )))
        }
    };
    let (default, max) = if export {
        (MAX_EXPORT, MAX_EXPORT)
    } else {
        (DEFAULT_LIMIT, MAX_JSON_LIMIT)
    };
    let limit = match q.limit.as_deref().filter(|l| !l.is_empty()) {
        None => default,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => n,
            _ => {
                return Err(ApiError::invalid(format!(
                    "limit must be a number from 1 to {max}"
                )))
            }
        },
    };
    let after_seq =
        match q.cursor.as_deref().filter(|c| !c.is_empty()) {
            None => None,
            Some(c) => Some(c.parse::<i64>().map_err(|_| {
                ApiError::invalid("cursor must be the next_cursor of a previous page")
            })?),
        };
    if let Some(o) = q.outcome.as_deref().filter(|o| !o.is_empty()) {
        if o != "ok" && o != "error" {
            return Err(ApiError::invalid("outcome must be ok or error"));
        }
    }
    let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
    let filter = AuditFilter {
        since_ms: time("since", q.since)?,
        until_ms: time("until", q.until)?,
        action: nonempty(q.action),
        actor: nonempty(q.actor),
        owner: nonempty(q.owner),
        target: nonempty(q.target),
        outcome: nonempty(q.outcome),
        after_seq,
        limit: limit + 1,
    };
    let mut records = s.engine.query_audit(filter).await?;
    let more = records.len() > limit;
    records.truncate(limit);
    let next = if more {
        records.last().map(|r| r.seq.to_string())
    } else {
        None
    };
    let mut resp = match format.as_str() {
        "jsonl" => {
            let mut out = String::new();
            for r in &records {
                out.push_str(&record_json(r).to_string());
                out.push('\n');
            }
            ([(header::CONTENT_TYPE, "application/x-ndjson")], out).into_response()
        }
        "csv" => {
            let mut out = String::from(CSV_HEADER);
            for r in &records {
                out.push_str(&csv_row(r));
            }
            ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], out).into_response()
        }
        _ => Json(json!({
            "records": records.iter().map(record_json).collect::<Vec<_>>(),
            "next_cursor": next,
        }))
        .into_response(),
    };
    if let Some(n) = next.and_then(|n| HeaderValue::from_str(&n).ok()) {
        resp.headers_mut().insert("x-next-cursor", n);
    }
    Ok(resp)
}

pub async fn verify(State(s): State<AppState>) -> ApiResult<Json<Value>> {
    let v = s.engine.verify_audit().await?;
    let mut out = json!({"ok": v.ok, "records": v.records});
    if let Some(b) = v.first_bad {
        out["first_bad"] = json!(b);
    }
    if let Some(r) = v.reason {
        out["reason"] = json!(r);
    }
    Ok(Json(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_it_must() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
