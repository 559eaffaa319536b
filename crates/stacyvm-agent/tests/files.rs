//! Integration tests of the `/v1/files*` routes against the real agent binary.

mod common;

use common::{enc, Agent};
use hyper::{Method, StatusCode};
use serde_json::json;
use stacyvm_agent_proto::{FileEntry, Status, WriteResult};
use std::os::unix::fs::PermissionsExt;
use std::time::Instant;

const BAD: StatusCode = StatusCode::BAD_REQUEST;
const INVALID: &str = "invalid_request";

fn q(route: &str, path: &str) -> String {
    format!("{route}?path={}", enc(path))
}

async fn put(a: &Agent, path: &str, data: Vec<u8>) -> WriteResult {
    a.ok(Method::PUT, &q("/v1/files", path), data).await
}

fn mode_of(p: &str) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn binary_round_trip() {
    let a = Agent::start();
    let p = format!("{}/bytes.bin", a.work.str());
    let all: Vec<u8> = (0..=255u8).collect();
    assert_eq!(put(&a, &p, all.clone()).await.size, 256);
    assert_eq!(std::fs::read(&p).unwrap(), all);
    let resp = a.send(Method::GET, &q("/v1/files", &p), "".into()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    assert_eq!(resp.headers()["content-length"], "256");
    let (status, body) = a.call(Method::GET, &q("/v1/files", &p), "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], &all[..]);
    // Empty files work both ways.
    let e = format!("{}/empty", a.work.str());
    assert_eq!(put(&a, &e, Vec::new()).await.size, 0);
    let (status, body) = a.call(Method::GET, &q("/v1/files", &e), "").await;
    assert_eq!((status, body.len()), (StatusCode::OK, 0));
    // No temporary files are left behind.
    let names: Vec<String> = std::fs::read_dir(a.work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.contains("stacyvm-tmp")),
        "{names:?}"
    );
}

#[tokio::test]
async fn big_file_round_trip() {
    let a = Agent::start();
    let p = format!("{}/big.bin", a.work.str());
    let len = 64 * 1024 * 1024;
    let mut data = Vec::with_capacity(len);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while data.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    let t0 = Instant::now();
    assert_eq!(put(&a, &p, data.clone()).await.size, len as u64);
    let up = t0.elapsed();
    let t0 = Instant::now();
    let (status, body) = a.call(Method::GET, &q("/v1/files", &p), "").await;
    let down = t0.elapsed();
    assert_eq!(status, StatusCode::OK);
    assert!(body[..] == data[..], "downloaded bytes differ");
    assert!(std::fs::read(&p).unwrap() == data, "written bytes differ");
    let mib = len as f64 / (1024.0 * 1024.0);
    eprintln!(
        "64 MiB: upload {:.0} MiB/s, download {:.0} MiB/s",
        mib / up.as_secs_f64(),
        mib / down.as_secs_f64()
    );
}

#[tokio::test]
async fn interrupted_upload_leaves_nothing_behind() {
    use tokio::io::AsyncWriteExt;
    let a = Agent::start();
    let w = a.work.str();
    let target = format!("{w}/partial.bin");
    let mut s = tokio::net::UnixStream::connect(&a.sock).await.unwrap();
    let head = format!(
        "PUT /v1/files?path={} HTTP/1.1\r\nHost: agent\r\nContent-Length: 10000000\r\n\r\n",
        common::enc(&target)
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![7u8; 300_000]).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    drop(s);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let names: Vec<String> = std::fs::read_dir(a.work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.is_empty(), "left behind: {names:?}");
    // Special files: a FIFO is refused instead of hanging.
    let fifo = format!("{w}/fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    a.err(Method::GET, &q("/v1/files", &fifo), "", BAD, INVALID)
        .await;
    // A /proc file (size 0 in stat) is sent in full.
    let (status, body) = a
        .call(Method::GET, "/v1/files?path=/proc/self/status", "")
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("Pid:"));
}

#[tokio::test]
async fn write_modes_parents_and_refusals() {
    let a = Agent::start();
    let w = a.work.str();
    let p = format!("{w}/new/deep/dir/f.txt");
    put(&a, &p, b"hi".to_vec()).await;
    assert_eq!(mode_of(&p), 0o644);
    assert_eq!(mode_of(&format!("{w}/new/deep")), 0o755);
    // Overwrite with a mode.
    let r: WriteResult = a
        .ok(
            Method::PUT,
            &format!("{}&mode=0600", q("/v1/files", &p)),
            "again",
        )
        .await;
    assert_eq!(r.size, 5);
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "again");
    assert_eq!(mode_of(&p), 0o600);
    let x = format!("{w}/run.sh");
    let _: WriteResult = a
        .ok(
            Method::PUT,
            &format!("{}&mode=755", q("/v1/files", &x)),
            "#!/bin/sh",
        )
        .await;
    assert_eq!(mode_of(&x), 0o755);
    a.err(
        Method::PUT,
        &format!("{}&mode=999", q("/v1/files", &x)),
        "",
        BAD,
        INVALID,
    )
    .await;
    a.err(
        Method::PUT,
        &format!("{}&mode=rwx", q("/v1/files", &x)),
        "",
        BAD,
        INVALID,
    )
    .await;
    // Existing directory as the target.
    let msg = a
        .err(
            Method::PUT,
            &q("/v1/files", &format!("{w}/new")),
            "x",
            BAD,
            INVALID,
        )
        .await;
    assert!(msg.contains("is a directory"), "{msg}");
    // A parent that is a file.
    a.err(
        Method::PUT,
        &q("/v1/files", &format!("{p}/below")),
        "x",
        BAD,
        INVALID,
    )
    .await;
    a.err(Method::PUT, "/v1/files", "x", BAD, INVALID).await;
}

#[tokio::test]
async fn read_errors() {
    let a = Agent::start();
    let w = a.work.str();
    let msg = a
        .err(
            Method::GET,
            &q("/v1/files", &format!("{w}/missing")),
            "",
            StatusCode::NOT_FOUND,
            "file_not_found",
        )
        .await;
    assert_eq!(msg, format!("no such file: {w}/missing"));
    let msg = a
        .err(Method::GET, &q("/v1/files", &w), "", BAD, INVALID)
        .await;
    assert!(msg.contains("is a directory"), "{msg}");
}

#[tokio::test]
async fn bad_and_reserved_paths_are_refused() {
    let a = Agent::start();
    let w = a.work.str();
    let cases = [
        "relative/path".to_string(),
        "".to_string(),
        "/../etc/passwd".to_string(),
        format!("{w}/../../../../../.."),
        "/.stacyvm/run/agent.sock".to_string(),
        "/.stacyvm".to_string(),
    ];
    for p in &cases {
        for route in ["/v1/files", "/v1/files/list", "/v1/files/stat"] {
            a.err(Method::GET, &q(route, p), "", BAD, INVALID).await;
        }
        a.err(Method::PUT, &q("/v1/files", p), "x", BAD, INVALID)
            .await;
        a.err(Method::DELETE, &q("/v1/files", p), "", BAD, INVALID)
            .await;
    }
    // NUL through percent-encoding.
    let nul = format!("/v1/files?path={w}/a%00b");
    let msg = a.err(Method::GET, &nul, "", BAD, INVALID).await;
    assert!(msg.contains("NUL"), "{msg}");
    a.err(Method::PUT, &nul, "x", BAD, INVALID).await;
    a.err(Method::GET, "/v1/files?path=%zz", "", BAD, INVALID)
        .await;
    a.err(
        Method::GET,
        "/v1/files/glob?pattern=/.stacyvm/*",
        "",
        BAD,
        INVALID,
    )
    .await;
    a.err(
        Method::GET,
        "/v1/files/glob?pattern=rel/*",
        "",
        BAD,
        INVALID,
    )
    .await;
    let mv = json!({"old_path": "/.stacyvm/stacyvm-agent", "new_path": format!("{w}/x")});
    a.err(Method::POST, "/v1/files/move", mv.to_string(), BAD, INVALID)
        .await;
    let ch = json!({"path": "/.stacyvm/run", "mode": "777"});
    a.err(
        Method::POST,
        "/v1/files/chmod",
        ch.to_string(),
        BAD,
        INVALID,
    )
    .await;
    a.err(Method::DELETE, "/v1/files?path=/", "", BAD, INVALID)
        .await;
}

#[tokio::test]
async fn list_and_stat() {
    let a = Agent::start();
    let w = a.work.str();
    std::fs::write(format!("{w}/b.txt"), "12345").unwrap();
    std::fs::create_dir(format!("{w}/a-dir")).unwrap();
    std::fs::create_dir(format!("{w}/empty")).unwrap();
    std::os::unix::fs::symlink(format!("{w}/a-dir"), format!("{w}/c-link")).unwrap();
    let l: Vec<FileEntry> = a.ok(Method::GET, &q("/v1/files/list", &w), "").await;
    let names: Vec<&str> = l.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, vec!["a-dir", "b.txt", "c-link", "empty"]);
    assert!(l[0].is_dir && !l[0].is_symlink);
    assert_eq!(l[1].size, 5);
    assert_eq!(l[1].path, format!("{w}/b.txt"));
    assert_eq!(l[1].mode, "644");
    assert!(!l[2].is_dir && l[2].is_symlink, "lstat, not the target");
    let empty: Vec<FileEntry> = a
        .ok(Method::GET, &q("/v1/files/list", &format!("{w}/empty")), "")
        .await;
    assert!(empty.is_empty());
    let msg = a
        .err(
            Method::GET,
            &q("/v1/files/list", &format!("{w}/b.txt")),
            "",
            BAD,
            INVALID,
        )
        .await;
    assert!(msg.contains("not a directory"), "{msg}");
    a.err(
        Method::GET,
        &q("/v1/files/list", &format!("{w}/nope")),
        "",
        StatusCode::NOT_FOUND,
        "file_not_found",
    )
    .await;

    let s: FileEntry = a
        .ok(Method::GET, &q("/v1/files/stat", &format!("{w}/b.txt")), "")
        .await;
    assert_eq!(s.name, "b.txt");
    assert_eq!(s.size, 5);
    assert!(!s.is_dir);
    // RFC 3339 UTC, e.g. 2024-01-02T03:04:05Z
    assert_eq!(s.mod_time.len(), 20, "{}", s.mod_time);
    assert!(s.mod_time.ends_with('Z') && &s.mod_time[10..11] == "T");
    let root: FileEntry = a.ok(Method::GET, "/v1/files/stat?path=/", "").await;
    assert!(root.is_dir);
    assert_eq!(root.name, "/");
    let link: FileEntry = a
        .ok(
            Method::GET,
            &q("/v1/files/stat", &format!("{w}/c-link")),
            "",
        )
        .await;
    assert!(link.is_symlink);
    a.err(
        Method::GET,
        &q("/v1/files/stat", &format!("{w}/nope")),
        "",
        StatusCode::NOT_FOUND,
        "file_not_found",
    )
    .await;
    // The agent's own tree is not listed.
    let top: Vec<FileEntry> = a.ok(Method::GET, "/v1/files/list?path=/", "").await;
    assert!(top.iter().all(|e| e.name != ".stacyvm"));
}

#[tokio::test]
async fn glob_patterns() {
    let a = Agent::start();
    let w = a.work.str();
    for f in [
        "a.py",
        "b.txt",
        "sub/a.txt",
        "sub/x/c.py",
        "sub/x/y/d.py",
        "[lit]",
    ] {
        let p = format!("{w}/{f}");
        std::fs::create_dir_all(std::path::Path::new(&p).parent().unwrap()).unwrap();
        std::fs::write(&p, "").unwrap();
    }
    let g = |pat: String| {
        let a = &a;
        async move {
            let r: Vec<String> = a
                .ok(
                    Method::GET,
                    &format!("/v1/files/glob?pattern={}", enc(&pat)),
                    "",
                )
                .await;
            r
        }
    };
    assert_eq!(g(format!("{w}/*.txt")).await, vec![format!("{w}/b.txt")]);
    assert_eq!(
        g(format!("{w}/**/*.py")).await,
        vec![
            format!("{w}/a.py"),
            format!("{w}/sub/x/c.py"),
            format!("{w}/sub/x/y/d.py")
        ]
    );
    assert_eq!(
        g(format!("{w}/s?b/[a-b].txt")).await,
        vec![format!("{w}/sub/a.txt")]
    );
    assert_eq!(g(format!("{w}/[!a].*")).await, vec![format!("{w}/b.txt")]);
    assert_eq!(g(format!("{w}/b.txt")).await, vec![format!("{w}/b.txt")]);
    assert!(g(format!("{w}/*.rs")).await.is_empty());
    assert!(g(format!("{w}/nope/**")).await.is_empty());
    a.err(Method::GET, "/v1/files/glob", "", BAD, INVALID).await;
}

#[tokio::test]
async fn move_files_and_dirs() {
    let a = Agent::start();
    let w = a.work.str();
    std::fs::write(format!("{w}/f"), "data").unwrap();
    let body = json!({"old_path": format!("{w}/f"), "new_path": format!("{w}/new/parent/g")});
    let s: Status = a.ok(Method::POST, "/v1/files/move", body.to_string()).await;
    assert_eq!(s.status, "moved");
    assert!(!std::path::Path::new(&format!("{w}/f")).exists());
    assert_eq!(
        std::fs::read_to_string(format!("{w}/new/parent/g")).unwrap(),
        "data"
    );
    let body = json!({"old_path": format!("{w}/new"), "new_path": format!("{w}/renamed")});
    let _: Status = a.ok(Method::POST, "/v1/files/move", body.to_string()).await;
    assert!(std::path::Path::new(&format!("{w}/renamed/parent/g")).exists());
    let body = json!({"old_path": format!("{w}/missing"), "new_path": format!("{w}/x")});
    a.err(
        Method::POST,
        "/v1/files/move",
        body.to_string(),
        StatusCode::NOT_FOUND,
        "file_not_found",
    )
    .await;
    let body = json!({"old_path": format!("{w}/renamed"), "new_path": format!("{w}/renamed/in")});
    a.err(
        Method::POST,
        "/v1/files/move",
        body.to_string(),
        BAD,
        INVALID,
    )
    .await;
    a.err(
        Method::POST,
        "/v1/files/move",
        "{\"old_path\": 1}",
        BAD,
        INVALID,
    )
    .await;
}

#[tokio::test]
async fn chmod_files() {
    let a = Agent::start();
    let w = a.work.str();
    let p = format!("{w}/f");
    std::fs::write(&p, "x").unwrap();
    let s: Status = a
        .ok(
            Method::POST,
            "/v1/files/chmod",
            json!({"path": p, "mode": "0751"}).to_string(),
        )
        .await;
    assert_eq!(s.status, "chmod applied");
    assert_eq!(mode_of(&p), 0o751);
    let st: FileEntry = a.ok(Method::GET, &q("/v1/files/stat", &p), "").await;
    assert_eq!(st.mode, "751");
    a.err(
        Method::POST,
        "/v1/files/chmod",
        json!({"path": p, "mode": "9"}).to_string(),
        BAD,
        INVALID,
    )
    .await;
    a.err(
        Method::POST,
        "/v1/files/chmod",
        json!({"path": format!("{w}/nope"), "mode": "644"}).to_string(),
        StatusCode::NOT_FOUND,
        "file_not_found",
    )
    .await;
}

#[tokio::test]
async fn delete_files_and_trees() {
    let a = Agent::start();
    let w = a.work.str();
    std::fs::write(format!("{w}/f"), "x").unwrap();
    std::fs::create_dir_all(format!("{w}/tree/sub")).unwrap();
    std::fs::write(format!("{w}/tree/sub/g"), "x").unwrap();
    std::fs::create_dir(format!("{w}/empty")).unwrap();
    // A link into a directory that must survive the recursive delete.
    std::fs::create_dir(format!("{w}/keep")).unwrap();
    std::fs::write(format!("{w}/keep/k"), "x").unwrap();
    std::os::unix::fs::symlink(format!("{w}/keep"), format!("{w}/tree/link")).unwrap();

    let del = |p: String, rec: bool| format!("/v1/files?path={}&recursive={rec}", enc(&p));
    let s: Status = a
        .ok(Method::DELETE, &del(format!("{w}/f"), false), "")
        .await;
    assert_eq!(s.status, "deleted");
    assert!(!std::path::Path::new(&format!("{w}/f")).exists());
    let _: Status = a
        .ok(Method::DELETE, &del(format!("{w}/empty"), false), "")
        .await;
    let msg = a
        .err(
            Method::DELETE,
            &del(format!("{w}/tree"), false),
            "",
            StatusCode::CONFLICT,
            "conflict",
        )
        .await;
    assert!(msg.contains("not empty"), "{msg}");
    let _: Status = a
        .ok(Method::DELETE, &del(format!("{w}/tree"), true), "")
        .await;
    assert!(!std::path::Path::new(&format!("{w}/tree")).exists());
    assert!(std::path::Path::new(&format!("{w}/keep/k")).exists());
    a.err(
        Method::DELETE,
        &del(format!("{w}/tree"), true),
        "",
        StatusCode::NOT_FOUND,
        "file_not_found",
    )
    .await;
    a.err(
        Method::DELETE,
        &del(format!("{w}/keep"), false).replace("false", "maybe"),
        "",
        BAD,
        INVALID,
    )
    .await;
}
