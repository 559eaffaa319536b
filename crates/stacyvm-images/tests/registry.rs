//! The store against a real registry: Debian's `docker-registry` on
//! loopback (started by `tests/registry.sh`), filled by `skopeo` with the
//! project's test image and two images built on top of it here.
//!
//! Needs root (whiteouts, overlayfs), a running dockerd holding the test
//! image (`STACYVM_TEST_IMAGE`, default `stacyvm-test/python:bookworm`), and
//! the Debian packages `docker-registry` and `skopeo` (the script installs
//! them when missing).

use flate2::write::GzEncoder;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use stacyvm_images::{
    is_opaque, is_whiteout, ImageError, ImageSource, ImageStore, PullProgress, StoreOptions,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

fn test_image() -> String {
    std::env::var("STACYVM_TEST_IMAGE").unwrap_or_else(|_| "stacyvm-test/python:bookworm".into())
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256(data: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(data))
}

// ---------------------------------------------------------------- registry

struct Registry {
    addr: String,
    pid: i32,
    dir: PathBuf,
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/registry.sh");
        let out = run(
            "bash",
            &[script.to_str().unwrap(), "start", dir.to_str().unwrap()],
        );
        let value = |key: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("registry.sh printed no {key}: {out}"))
                .to_string()
        };
        Registry {
            addr: value("REGISTRY_ADDR="),
            pid: value("REGISTRY_PID=").parse().expect("pid"),
            dir: dir.to_path_buf(),
        }
    }

    fn stop(&mut self) {
        if self.pid <= 0 {
            return;
        }
        // SAFETY: plain kill(2) on the registry we started.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        // SAFETY: signal 0 only checks that the process exists.
        while Instant::now() < deadline && unsafe { libc::kill(self.pid, 0) } == 0 {
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        self.pid = 0;
    }

    fn v2(&self) -> PathBuf {
        self.dir.join("storage/docker/registry/v2")
    }

    fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = &digest[7..];
        self.v2()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The manifest digest a tag points at, read from the registry's storage.
    fn tag_digest(&self, repo: &str, tag: &str) -> String {
        let link = self
            .v2()
            .join("repositories")
            .join(repo)
            .join("_manifests/tags")
            .join(tag)
            .join("current/link");
        std::fs::read_to_string(&link)
            .unwrap_or_else(|e| panic!("{}: {e}", link.display()))
            .trim()
            .to_string()
    }

    fn push(&self, layout: &Path, name: &str, repo_tag: &str) {
        let src = format!("oci:{}:{name}", layout.display());
        let dst = format!("docker://{}/{repo_tag}", self.addr);
        run(
            "skopeo",
            &["copy", "-q", "--dest-tls-verify=false", &src, &dst],
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------- OCI layout

#[derive(Default)]
struct Layer {
    b: Option<tar::Builder<Vec<u8>>>,
}

impl Layer {
    fn new() -> Layer {
        Layer {
            b: Some(tar::Builder::new(Vec::new())),
        }
    }
    fn add(mut self, path: &str, kind: tar::EntryType, data: &[u8]) -> Layer {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        h.set_path(path).expect("path");
        h.set_cksum();
        self.b
            .as_mut()
            .expect("builder")
            .append(&h, data)
            .expect("append");
        self
    }
    fn dir(self, path: &str) -> Layer {
        self.add(path, tar::EntryType::Directory, b"")
    }
    fn file(self, path: &str, data: &[u8]) -> Layer {
        self.add(path, tar::EntryType::Regular, data)
    }
    fn tar(mut self) -> Vec<u8> {
        self.b.take().expect("builder").into_inner().expect("tar")
    }
}

struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn blob_path(&self, digest: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(&digest[7..])
    }
    fn put(&self, data: &[u8]) -> (String, u64) {
        let d = sha256(data);
        std::fs::write(self.blob_path(&d), data).expect("write blob");
        (d, data.len() as u64)
    }
    fn get_json(&self, digest: &str) -> Value {
        serde_json::from_slice(&std::fs::read(self.blob_path(digest)).expect("read blob"))
            .expect("json blob")
    }
    fn index(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.dir.join("index.json")).expect("index"))
            .expect("index json")
    }
    fn manifest_digest(&self, name: &str) -> String {
        let index = self.index();
        index["manifests"]
            .as_array()
            .expect("manifests")
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == name)
            .unwrap_or_else(|| panic!("no {name} in the layout"))["digest"]
            .as_str()
            .expect("digest")
            .to_string()
    }

    /// A new image `name`: `base` plus the given layers (gzip). Returns the
    /// blob digests of the new layers.
    fn derive(&self, base: &str, name: &str, layers: Vec<Vec<u8>>) -> Vec<String> {
        let mut man = self.get_json(&self.manifest_digest(base));
        let mut config = self.get_json(man["config"]["digest"].as_str().expect("config"));
        let mut blobs = Vec::new();
        for tar in layers {
            let diff_id = sha256(&tar);
            let mut gz = GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(&tar).expect("gzip");
            let (digest, size) = self.put(&gz.finish().expect("gzip"));
            man["layers"].as_array_mut().expect("layers").push(json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest,
                "size": size,
            }));
            config["rootfs"]["diff_ids"]
                .as_array_mut()
                .expect("diff_ids")
                .push(json!(diff_id));
            if let Some(h) = config.get_mut("history").and_then(|h| h.as_array_mut()) {
                h.push(json!({"created_by": "stacyvm-images test layer"}));
            }
            blobs.push(digest);
        }
        let (cd, cs) = self.put(&serde_json::to_vec(&config).expect("config"));
        man["config"]["digest"] = json!(cd);
        man["config"]["size"] = json!(cs);
        let (md, ms) = self.put(&serde_json::to_vec(&man).expect("manifest"));
        let mut index = self.index();
        index["manifests"]
            .as_array_mut()
            .expect("manifests")
            .push(json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": md,
                "size": ms,
                "annotations": {"org.opencontainers.image.ref.name": name},
            }));
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).expect("index"),
        )
        .expect("write index");
        blobs
    }
}

// ---------------------------------------------------------------- mounts

struct Mount(PathBuf);

impl Mount {
    fn overlay(lowerdir: &str, upper: &Path, work: &Path, target: &Path) -> Mount {
        let opts = format!(
            "lowerdir={lowerdir},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        let c = |s: &str| std::ffi::CString::new(s).expect("cstring");
        let (src, tgt, fs, data) = (
            c("overlay"),
            c(target.to_str().expect("utf8")),
            c("overlay"),
            c(&opts),
        );
        // SAFETY: valid C strings.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                tgt.as_ptr(),
                fs.as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mount -t overlay -o {opts} {}: {}",
            target.display(),
            std::io::Error::last_os_error()
        );
        Mount(target.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Ok(c) = std::ffi::CString::new(self.0.to_str().unwrap_or_default()) {
            // SAFETY: a valid C string.
            if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
                // SAFETY: as above.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

// ---------------------------------------------------------------- the test

fn dirs_in(p: &Path) -> usize {
    std::fs::read_dir(p)
        .expect("read_dir")
        .filter(|e| e.as_ref().map(|e| e.path().is_dir()).unwrap_or(false))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_from_a_real_registry() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test must run as root (whiteouts, overlayfs mounts)"
    );
    let image = test_image();
    let inspect = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", &image])
        .output();
    match inspect {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "docker image {image} is not available (build it with scripts/build-test-image.sh): {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("cannot run docker (a running dockerd with {image} is required): {e}"),
    }

    let t0 = Instant::now();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut registry = Registry::start(&tmp.path().join("registry"));
    let addr = registry.addr.clone();

    // The test image, then two images on top of it, in one OCI layout.
    let layout = Layout {
        dir: tmp.path().join("oci"),
    };
    run(
        "skopeo",
        &[
            "copy",
            "-q",
            &format!("docker-daemon:{image}"),
            &format!("oci:{}:base", layout.dir.display()),
        ],
    );
    let top = Layer::new()
        .dir("opt/")
        .dir("opt/stacyvm/")
        .file("opt/stacyvm/top.txt", b"from the top layer\n")
        .dir("usr/")
        .dir("usr/share/")
        .file("usr/share/.wh.doc", b"")
        .dir("etc/")
        .dir("etc/apt/")
        .file("etc/apt/.wh..wh..opq", b"")
        .file("etc/apt/new", b"new\n")
        .tar();
    let top_blob = layout.derive("base", "two", vec![top]).remove(0);
    let odd = Layer::new().file("tampered.txt", b"original\n").tar();
    let odd_blob = layout.derive("base", "tampered", vec![odd]).remove(0);
    registry.push(&layout.dir, "base", "test/python:bookworm");
    registry.push(&layout.dir, "two", "test/two:latest");
    registry.push(&layout.dir, "tampered", "test/tampered:1");
    eprintln!("registry ready and filled in {:?}", t0.elapsed());

    let root = tmp.path().join("store");
    let store = ImageStore::open(&root, StoreOptions::default()).expect("open");
    let events = Mutex::new(Vec::<PullProgress>::new());
    let record = |p: &PullProgress| events.lock().unwrap().push(p.clone());

    // --- pull the python image
    let one_ref = format!("{addr}/test/python:bookworm");
    let started = Instant::now();
    let one = store.pull(&one_ref, &record).await.expect("pull python");
    let pull_time = started.elapsed();
    let downloaded: u64 = events
        .lock()
        .unwrap()
        .iter()
        .find_map(|e| match e {
            PullProgress::Done { downloaded, .. } => Some(*downloaded),
            _ => None,
        })
        .expect("a Done event");
    eprintln!(
        "pulled {one_ref} in {pull_time:?}: {downloaded} bytes downloaded, {} bytes extracted",
        one.size
    );
    assert_eq!(one.reference, one_ref);
    assert_eq!(one.source, ImageSource::Registry);
    assert_eq!(
        one.digest,
        registry.tag_digest("test/python", "bookworm"),
        "the manifest digest the registry stores"
    );
    assert_eq!(one.layers.len(), 1);
    let base = &one.layers[0];
    assert!(
        base.join("usr/bin/python3").symlink_metadata().is_ok(),
        "python3 in the base layer"
    );
    assert!(base.join("usr/share/doc").is_dir());
    assert!(base.join("etc/apt").is_dir());
    {
        let ev = events.lock().unwrap();
        assert!(matches!(ev.first(), Some(PullProgress::Resolving { .. })));
        assert!(ev.iter().any(|e| matches!(e, PullProgress::Layer { downloaded, total, .. } if downloaded == total && *total > 0)));
        assert!(ev
            .iter()
            .any(|e| matches!(e, PullProgress::Extracting { .. })));
    }

    // --- the two-layer image shares the base layer
    events.lock().unwrap().clear();
    let two_ref = format!("{addr}/test/two:latest");
    let two = store.pull(&two_ref, &record).await.expect("pull two");
    assert_eq!(two.layers.len(), 2);
    assert_eq!(two.layers[0], one.layers[0], "base layer shared");
    assert_eq!(dirs_in(&root.join("layers")), 2, "base stored once");
    {
        let ev = events.lock().unwrap();
        assert_eq!(
            ev.iter()
                .filter(|e| matches!(e, PullProgress::LayerExists { .. }))
                .count(),
            1,
            "the base layer is not downloaded again: {ev:?}"
        );
        assert!(ev
            .iter()
            .all(|e| !matches!(e, PullProgress::Layer { digest, .. } if digest != &top_blob)));
    }
    let upper_layer = &two.layers[1];
    assert!(
        is_whiteout(&upper_layer.join("usr/share/doc")),
        "whiteout converted"
    );
    assert!(!upper_layer.join("usr/share/.wh.doc").exists());
    assert!(
        is_opaque(&upper_layer.join("etc/apt")),
        "opaque dir converted"
    );
    assert!(!upper_layer.join("etc/apt/.wh..wh..opq").exists());
    assert_eq!(two.digest, registry.tag_digest("test/two", "latest"));

    // --- pulling again asks the registry but downloads nothing
    events.lock().unwrap().clear();
    let again = store
        .pull(&one_ref, &record)
        .await
        .expect("pull python again");
    assert_eq!(again, one, "same image, same record (time included)");
    assert!(events
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, PullProgress::Done { downloaded: 0, .. })));

    // --- ensure of a stored image sends nothing
    let before = store.registry_requests();
    let again = store.ensure(&two_ref, &|_| {}).await.expect("ensure");
    assert_eq!(again, two);
    assert_eq!(
        store.registry_requests(),
        before,
        "ensure made HTTP requests"
    );
    let by_digest = store
        .ensure(&format!("{addr}/test/two@{}", two.digest), &|_| {})
        .await
        .expect("ensure by digest");
    assert_eq!(by_digest.reference, two.reference);
    assert_eq!(store.registry_requests(), before);

    // --- unknown tags and repositories
    for missing in [
        format!("{addr}/test/python:nope"),
        format!("{addr}/test/absent:latest"),
        format!("{addr}/test/python@sha256:{}", "0".repeat(64)),
    ] {
        match store.pull(&missing, &|_| {}).await {
            Err(ImageError::NotFound(_)) => {}
            other => panic!("{missing}: expected NotFound, got {other:?}"),
        }
    }

    // --- a blob altered in the registry is refused, nothing is stored
    let data = registry.blob_data(&odd_blob);
    let mut bytes = std::fs::read(&data).expect("tampered blob");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, &bytes).expect("tamper");
    match store
        .pull(&format!("{addr}/test/tampered:1"), &|_| {})
        .await
    {
        Err(ImageError::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, odd_blob);
            assert_eq!(actual, sha256(&bytes));
        }
        other => panic!("expected DigestMismatch, got {other:?}"),
    }
    assert!(store
        .get(&format!("{addr}/test/tampered:1"))
        .unwrap()
        .is_none());
    assert_eq!(
        dirs_in(&root.join("layers")),
        2,
        "no layer of the tampered image"
    );
    assert_eq!(std::fs::read_dir(root.join("tmp")).unwrap().count(), 0);

    // --- two handles (as two processes would) pull the same image at once
    let root2 = tmp.path().join("store2");
    let s1 = ImageStore::open(&root2, StoreOptions::default()).expect("open");
    let s2 = ImageStore::open(&root2, StoreOptions::default()).expect("open");
    let (a, b) = tokio::join!(s1.pull(&two_ref, &|_| {}), s2.pull(&two_ref, &|_| {}));
    let (a, b) = (a.expect("pull a"), b.expect("pull b"));
    assert_eq!(a, b.clone().with_created_at(&a.created_at));
    assert_eq!(dirs_in(&root2.join("layers")), 2);
    assert_eq!(std::fs::read_dir(root2.join("tmp")).unwrap().count(), 0);
    drop((s1, s2));
    std::fs::remove_dir_all(&root2).expect("cleanup store2");

    // --- without the registry, ensure still answers
    registry.stop();
    let offline = ImageStore::open(&root, StoreOptions::default()).expect("open");
    let got = offline
        .ensure(&two_ref, &|_| {})
        .await
        .expect("offline ensure");
    assert_eq!(got, two);
    assert_eq!(offline.registry_requests(), 0);
    match offline.pull(&two_ref, &|_| {}).await {
        Err(ImageError::Network(_)) => {}
        other => panic!("pull without a registry: expected Network, got {other:?}"),
    }

    // --- mount it: the top layer's file is there, the deleted paths are not
    let (upper, work, mnt) = (
        tmp.path().join("upper"),
        tmp.path().join("work"),
        tmp.path().join("mnt"),
    );
    for d in [&upper, &work, &mnt] {
        std::fs::create_dir(d).expect("mkdir");
    }
    {
        let _m = Mount::overlay(&two.overlay_lowerdir(), &upper, &work, &mnt);
        assert_eq!(
            std::fs::read_to_string(mnt.join("opt/stacyvm/top.txt")).unwrap(),
            "from the top layer\n"
        );
        assert!(
            !mnt.join("usr/share/doc").exists(),
            "whited-out dir visible"
        );
        assert!(mnt.join("usr/share").is_dir());
        let apt: Vec<String> = std::fs::read_dir(mnt.join("etc/apt"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(apt, ["new"], "opaque dir hides the lower one's entries");
        assert!(mnt.join("usr/bin/python3").exists(), "python3 in the tree");
        let out = run(
            "chroot",
            &[
                mnt.to_str().unwrap(),
                "/usr/bin/python3",
                "-c",
                "print(6 * 7)",
            ],
        );
        assert_eq!(out.trim(), "42");
    }

    // --- removing keeps what the other image still uses
    store.remove(&two_ref).expect("remove two");
    assert!(store.get(&two_ref).unwrap().is_none());
    assert!(one.layers[0].is_dir(), "shared base survives");
    assert!(!two.layers[1].exists(), "top layer collected");
    store.remove(&one_ref).expect("remove one");
    assert_eq!(dirs_in(&root.join("layers")), 0);
    assert!(store.list().unwrap().is_empty());
    eprintln!("registry test done in {:?}", t0.elapsed());
}

trait WithCreatedAt {
    fn with_created_at(self, t: &str) -> Self;
}

impl WithCreatedAt for stacyvm_images::ImageInfo {
    fn with_created_at(mut self, t: &str) -> Self {
        self.created_at = t.to_string();
        self
    }
}
