//! The registry client against a small in-process registry on loopback that
//! behaves like Docker Hub where the real one cannot be reached from tests:
//! bearer-token challenges, blobs redirected to another host, multi-platform
//! indexes, private repositories, and registries that lie.

use bytes::Bytes;
use flate2::write::GzEncoder;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use sha2::{Digest, Sha256};
use stacyvm_images::{Credentials, ImageError, ImageStore, PullProgress, StoreOptions};
use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::sync::{Arc, Mutex};

const TOKEN: &str = "t0k3n";
const PRIVATE_TOKEN: &str = "pr1vate";
const BASIC: &str = "Basic dXNlcjpwdw=="; // user:pw

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[derive(Default)]
struct State {
    port: u16,
    /// tag or digest → (content type, body); per repository path.
    manifests: HashMap<(String, String), (String, Vec<u8>)>,
    blobs: HashMap<String, Vec<u8>>,
    /// (path, authorization header) of every request.
    log: Vec<(String, Option<String>)>,
}

type Shared = Arc<Mutex<State>>;

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

fn handle(state: &Shared, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut st = state.lock().unwrap();
    st.log.push((format!("{path}?{query}"), auth.clone()));
    let port = st.port;

    if path == "/token" {
        if query.contains("repository%3Aprivate%2Fimg%3Apull") {
            if auth.as_deref() != Some(BASIC) {
                return reply(
                    StatusCode::UNAUTHORIZED,
                    r#"{"details":"incorrect username or password"}"#,
                );
            }
            return reply(
                StatusCode::OK,
                json!({ "token": PRIVATE_TOKEN }).to_string(),
            );
        }
        if !query.contains("service=fake") {
            return reply(StatusCode::BAD_REQUEST, "no service");
        }
        return reply(StatusCode::OK, json!({ "access_token": TOKEN }).to_string());
    }
    if let Some(digest) = path.strip_prefix("/cdn/") {
        if auth.is_some() {
            return reply(
                StatusCode::BAD_REQUEST,
                "registry credentials leaked to the CDN",
            );
        }
        return match st.blobs.get(digest) {
            Some(b) => reply(StatusCode::OK, b.clone()),
            None => reply(StatusCode::NOT_FOUND, ""),
        };
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return reply(StatusCode::NOT_FOUND, "");
    };
    let (repo, kind, object) = {
        let parts: Vec<&str> = rest.rsplitn(3, '/').collect();
        if parts.len() != 3 {
            return reply(StatusCode::NOT_FOUND, "");
        }
        (
            parts[2].to_string(),
            parts[1].to_string(),
            parts[0].to_string(),
        )
    };
    let expected = if repo == "private/img" {
        PRIVATE_TOKEN
    } else {
        TOKEN
    };
    if auth.as_deref() != Some(&format!("Bearer {expected}")) {
        let mut r = reply(
            StatusCode::UNAUTHORIZED,
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
        );
        r.headers_mut().insert(
            "www-authenticate",
            format!(
                "Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"fake\",scope=\"repository:{repo}:pull\""
            )
            .parse()
            .unwrap(),
        );
        return r;
    }
    match kind.as_str() {
        "manifests" => match st.manifests.get(&(repo, object.clone())) {
            Some((ct, body)) => {
                let mut r = reply(StatusCode::OK, body.clone());
                r.headers_mut().insert("content-type", ct.parse().unwrap());
                let digest = if object == "wrongheader" {
                    format!("sha256:{}", "1".repeat(64))
                } else {
                    sha256(body)
                };
                r.headers_mut()
                    .insert("docker-content-digest", digest.parse().unwrap());
                r
            }
            None => reply(
                StatusCode::NOT_FOUND,
                r#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
            ),
        },
        "blobs" => {
            if !st.blobs.contains_key(&object) {
                return reply(
                    StatusCode::NOT_FOUND,
                    r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}"#,
                );
            }
            // Like Docker Hub: blobs live on another host.
            let mut r = reply(StatusCode::TEMPORARY_REDIRECT, "");
            r.headers_mut().insert(
                "location",
                format!("http://localhost:{port}/cdn/{object}")
                    .parse()
                    .unwrap(),
            );
            r
        }
        _ => reply(StatusCode::NOT_FOUND, ""),
    }
}

async fn serve(state: Shared) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    state.lock().unwrap().port = port;
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let st = state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let r = handle(&st, &req);
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    port
}

struct Image {
    manifest: Vec<u8>,
    layer_blob: String,
}

fn layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        h.set_size(data.len() as u64);
        h.set_path(name).unwrap();
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Store a one-layer image's blobs; `diff_id` overrides the real one.
fn add_image(st: &mut State, tar: &[u8], layer_type: &str, diff_id: Option<String>) -> Image {
    let blob = gzip(tar);
    let layer_blob = sha256(&blob);
    st.blobs.insert(layer_blob.clone(), blob.clone());
    let config = json!({
        "architecture": host_arch(),
        "os": "linux",
        "config": {"Env": ["A=1"], "Cmd": ["sh"], "WorkingDir": "/w", "User": "1000"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id.unwrap_or_else(|| sha256(tar))]},
    })
    .to_string()
    .into_bytes();
    let config_digest = sha256(&config);
    st.blobs.insert(config_digest.clone(), config.clone());
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": layer_type, "digest": layer_blob, "size": blob.len()}],
    })
    .to_string()
    .into_bytes();
    Image {
        manifest,
        layer_blob,
    }
}

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const GZIP_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

fn put_manifest(st: &mut State, repo: &str, object: &str, ct: &str, body: Vec<u8>) {
    st.manifests.insert(
        (repo.to_string(), object.to_string()),
        (ct.to_string(), body),
    );
}

fn index(entries: &[(&str, &str, &[u8])]) -> Vec<u8> {
    let manifests: Vec<_> = entries
        .iter()
        .map(|(os, arch, body)| {
            json!({
                "mediaType": DOCKER_MANIFEST,
                "digest": sha256(body),
                "size": body.len(),
                "platform": {"os": os, "architecture": arch},
            })
        })
        .collect();
    json!({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": manifests})
        .to_string()
        .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speaks_the_distribution_protocol() {
    let state: Shared = Arc::new(Mutex::new(State::default()));
    let port = serve(state.clone()).await;
    let reg = format!("127.0.0.1:{port}");
    let foreign_arch = if host_arch() == "s390x" {
        "ppc64le"
    } else {
        "s390x"
    };

    let (good, lying_sub_digest) = {
        let mut st = state.lock().unwrap();
        // A multi-platform image: the host's entry must be chosen.
        let good = add_image(
            &mut st,
            &layer(&[("hello.txt", b"hello")]),
            GZIP_LAYER,
            None,
        );
        let other = add_image(&mut st, &layer(&[("other.txt", b"x")]), GZIP_LAYER, None);
        let idx = index(&[
            ("linux", foreign_arch, &other.manifest),
            ("linux", host_arch(), &good.manifest),
        ]);
        put_manifest(&mut st, "org/img", "multi", DOCKER_LIST, idx);
        for m in [&good.manifest, &other.manifest] {
            put_manifest(&mut st, "org/img", &sha256(m), DOCKER_MANIFEST, m.clone());
        }
        // Only a foreign platform.
        let idx = index(&[("linux", foreign_arch, &other.manifest)]);
        put_manifest(&mut st, "org/img", "foreign", DOCKER_LIST, idx);
        // An index whose entry is served with other bytes.
        let lying = add_image(&mut st, &layer(&[("l", b"l")]), GZIP_LAYER, None);
        let idx = index(&[("linux", host_arch(), &lying.manifest)]);
        put_manifest(&mut st, "org/img", "lying", DOCKER_LIST, idx);
        let lying_sub_digest = sha256(&lying.manifest);
        put_manifest(
            &mut st,
            "org/img",
            &lying_sub_digest,
            DOCKER_MANIFEST,
            other.manifest.clone(),
        );
        // A Docker-Content-Digest header that does not match the body.
        put_manifest(
            &mut st,
            "org/img",
            "wrongheader",
            DOCKER_MANIFEST,
            good.manifest.clone(),
        );
        // zstd layers.
        let z = add_image(
            &mut st,
            &layer(&[("z", b"z")]),
            "application/vnd.oci.image.layer.v1.tar+zstd",
            None,
        );
        put_manifest(&mut st, "org/img", "zstd", DOCKER_MANIFEST, z.manifest);
        // A config whose diff id does not match the layer's content.
        let bad = add_image(
            &mut st,
            &layer(&[("d", b"d")]),
            GZIP_LAYER,
            Some(format!("sha256:{}", "2".repeat(64))),
        );
        put_manifest(&mut st, "org/img", "baddiff", DOCKER_MANIFEST, bad.manifest);
        // A private repository.
        let p = add_image(&mut st, &layer(&[("p", b"p")]), GZIP_LAYER, None);
        put_manifest(
            &mut st,
            "private/img",
            "latest",
            DOCKER_MANIFEST,
            p.manifest,
        );
        (good, lying_sub_digest)
    };

    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("s"), StoreOptions::default()).unwrap();

    // --- token dance, index, redirect without credentials
    let events = Mutex::new(Vec::new());
    let info = store
        .pull(&format!("{reg}/org/img:multi"), &|p: &PullProgress| {
            events.lock().unwrap().push(p.clone())
        })
        .await
        .expect("pull multi");
    assert_eq!(info.reference, format!("{reg}/org/img:multi"));
    let idx_digest = {
        let st = state.lock().unwrap();
        sha256(&st.manifests[&("org/img".to_string(), "multi".to_string())].1)
    };
    assert_eq!(info.digest, idx_digest, "the digest of what the tag names");
    assert_eq!(
        std::fs::read(info.layers[0].join("hello.txt")).unwrap(),
        b"hello",
        "the host platform's image was chosen"
    );
    assert_eq!(info.config.env, ["A=1"]);
    assert_eq!(info.config.cmd, ["sh"]);
    assert_eq!(info.config.working_dir.as_deref(), Some("/w"));
    assert_eq!(info.config.user.as_deref(), Some("1000"));
    {
        let st = state.lock().unwrap();
        let tokens = st
            .log
            .iter()
            .filter(|(p, _)| p.starts_with("/token"))
            .count();
        assert_eq!(tokens, 1, "one token, then reused: {:?}", st.log);
        let cdn: Vec<_> = st
            .log
            .iter()
            .filter(|(p, _)| p.starts_with("/cdn/"))
            .collect();
        assert_eq!(cdn.len(), 2, "config and layer came from the CDN");
        assert!(cdn.iter().all(|(_, a)| a.is_none()));
        assert!(cdn.iter().any(|(p, _)| p.contains(&good.layer_blob[7..])));
    }
    let ev = events.lock().unwrap().clone();
    assert!(
        matches!(ev.last(), Some(PullProgress::Done { .. })),
        "{ev:?}"
    );

    // The same image by digest: the stored copy answers, no request.
    let n = store.registry_requests();
    let again = store
        .ensure(&format!("{reg}/org/img@{idx_digest}"), &|_| {})
        .await
        .unwrap();
    assert_eq!(again.reference, info.reference);
    assert_eq!(store.registry_requests(), n);

    // --- failures are typed and store nothing
    let expect = |r: Result<stacyvm_images::ImageInfo, ImageError>, what: &str| match r {
        Err(e) => e,
        Ok(i) => panic!("{what}: expected an error, got {i:?}"),
    };
    let e = expect(
        store.pull(&format!("{reg}/org/img:foreign"), &|_| {}).await,
        "foreign",
    );
    assert!(
        matches!(&e, ImageError::Unsupported(m) if m.contains(foreign_arch)),
        "{e:?}"
    );
    let e = expect(
        store.pull(&format!("{reg}/org/img:lying"), &|_| {}).await,
        "lying",
    );
    assert!(
        matches!(&e, ImageError::DigestMismatch { expected, .. } if expected == &lying_sub_digest),
        "{e:?}"
    );
    let e = expect(
        store
            .pull(&format!("{reg}/org/img:wrongheader"), &|_| {})
            .await,
        "wrongheader",
    );
    assert!(matches!(e, ImageError::DigestMismatch { .. }), "{e:?}");
    let e = expect(
        store.pull(&format!("{reg}/org/img:zstd"), &|_| {}).await,
        "zstd",
    );
    assert!(
        matches!(&e, ImageError::Unsupported(m) if m.contains("zstd")),
        "{e:?}"
    );
    let e = expect(
        store.pull(&format!("{reg}/org/img:baddiff"), &|_| {}).await,
        "baddiff",
    );
    assert!(
        matches!(&e, ImageError::DigestMismatch { expected, .. } if expected.starts_with("sha256:2222")),
        "{e:?}"
    );
    let e = expect(
        store.pull(&format!("{reg}/org/img:none"), &|_| {}).await,
        "none",
    );
    assert!(matches!(e, ImageError::NotFound(_)), "{e:?}");
    let e = expect(
        store.pull(&format!("{reg}/private/img"), &|_| {}).await,
        "private",
    );
    assert!(
        matches!(&e, ImageError::Auth(m) if m.contains("incorrect")),
        "{e:?}"
    );
    let e = expect(store.pull("Not A Reference", &|_| {}).await, "garbage");
    assert!(matches!(e, ImageError::InvalidReference { .. }), "{e:?}");
    assert_eq!(
        store.list().unwrap().len(),
        1,
        "only the good image is stored"
    );
    let layers = std::fs::read_dir(tmp.path().join("s/layers"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().is_dir())
        .count();
    assert_eq!(layers, 1, "nothing of the failed pulls is stored");
    assert_eq!(
        std::fs::read_dir(tmp.path().join("s/tmp")).unwrap().count(),
        0
    );

    // --- credentials are used for the token
    let mut creds = HashMap::new();
    creds.insert(
        reg.clone(),
        Credentials {
            username: "user".into(),
            password: "pw".into(),
        },
    );
    let authed = ImageStore::open(
        &tmp.path().join("s"),
        StoreOptions {
            credentials: creds,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let p = authed
        .pull(&format!("{reg}/private/img"), &|_| {})
        .await
        .expect("pull with credentials");
    assert_eq!(std::fs::read(p.layers[0].join("p")).unwrap(), b"p");
    assert!(!format!(
        "{:?}",
        Credentials {
            username: "u".into(),
            password: "secret".into()
        }
    )
    .contains("secret"));

    // --- nothing listens: a network error
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let e = expect(
        store
            .pull(&format!("127.0.0.1:{closed}/a/b"), &|_| {})
            .await,
        "closed port",
    );
    assert!(matches!(e, ImageError::Network(_)), "{e:?}");
}
