//! `stacyvm bench`: latency, throughput and memory of StacyVM against peers
//! measured in the same run, on the same machine and image: Docker's own CLI
//! (`docker exec`, `docker run`, `docker cp`), the Docker provider, and raw
//! namespace launches (`bwrap`, `unshare`) of the same command.
//!
//! Live previews are measured against the same app fetched from inside the
//! sandbox: one client script, run once inside the sandbox against
//! `127.0.0.1:{port}` and once on the host through the proxy
//! (`{port}-{id}.{preview_domain}` on the server's address).
//!
//! Without `--target` it starts a private server (this binary, `serve`) on a
//! loopback port with a temporary data directory (sharing the regular image
//! store, so images stay warm), and stops it afterwards.

use crate::client::{empty, enc, full, Client};
use crate::server_proc::{OwnServer, ServerOptions};
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Args;
use http::Method;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct BenchArgs {
    /// Benchmark an already running server instead of starting one.
    #[arg(long = "target", value_name = "URL")]
    target: Option<String>,
    /// Image for every sandbox (must exist in the local Docker daemon and in
    /// the native image store, or be pullable).
    #[arg(
        long,
        env = "STACYVM_TEST_IMAGE",
        default_value = "stacyvm-test/python:bookworm"
    )]
    image: String,
    /// Providers to measure.
    #[arg(long, value_delimiter = ',', default_value = "native,docker")]
    providers: Vec<String>,
    /// Idle native sandboxes kept alive at once for the memory measurement
    /// (0 skips it).
    #[arg(long, default_value_t = 200)]
    idle_sandboxes: usize,
    /// Idle Docker sandboxes for the memory peer.
    #[arg(long, default_value_t = 20)]
    idle_docker_sandboxes: usize,
    /// Exec round trips through the API.
    #[arg(long, default_value_t = 300)]
    exec_iterations: usize,
    /// `docker exec` round trips (each costs ~100 ms).
    #[arg(long, default_value_t = 30)]
    docker_exec_iterations: usize,
    /// create→first exec iterations of the native provider (and the raw
    /// namespace launch peers).
    #[arg(long, default_value_t = 100)]
    create_iterations: usize,
    /// create→first exec iterations of the Docker provider (and `docker run`).
    #[arg(long, default_value_t = 15)]
    docker_create_iterations: usize,
    /// create→first exec iterations of the proot provider (and raw `proot`
    /// launches of `true` on the image's root filesystem).
    #[arg(long, default_value_t = 10)]
    proot_create_iterations: usize,
    /// Spawns from a template with a warm pool (and plain creates to
    /// compare) on the native provider.
    #[arg(long, default_value_t = 50)]
    spawn_iterations: usize,
    /// Size of the transfer test file in MiB.
    #[arg(long, default_value_t = 64)]
    transfer_mib: usize,
    /// Transfer repetitions each way.
    #[arg(long, default_value_t = 3)]
    transfer_iterations: usize,
    /// Sequential GETs each way (direct in the sandbox, through the preview
    /// proxy) on the native provider; 0 skips the preview measurement.
    #[arg(long, default_value_t = 500)]
    preview_iterations: usize,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// Summary of one series of samples.
#[derive(Debug, Clone, Copy)]
struct Stats {
    p50: f64,
    /// 99th percentile of latencies (slow tail); for throughput, the 1st
    /// percentile (slowest transfers).
    p99: f64,
    mean: f64,
    n: usize,
}

fn stats(samples: &mut [f64], lower_better: bool) -> Stats {
    samples.sort_by(|a, b| a.total_cmp(b));
    let n = samples.len().max(1);
    let pick = |q: f64| samples[((q * (n as f64 - 1.0)).round() as usize).min(n - 1)];
    Stats {
        p50: pick(0.5),
        p99: if lower_better { pick(0.99) } else { pick(0.01) },
        mean: samples.iter().sum::<f64>() / n as f64,
        n: samples.len(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn docker(args: &[&str]) -> Result<Duration> {
    let t = Instant::now();
    let out = Command::new("docker")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("running the docker CLI (peer measurement)")?;
    let d = t.elapsed();
    if !out.status.success() {
        bail!(
            "docker {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(d)
}

async fn create(c: &Client, image: &str, provider: &str) -> Result<String> {
    let sb = c
        .json(
            Method::POST,
            "/api/v1/sandboxes",
            Some(&json!({"image": image, "provider": provider, "ttl": "15m", "metadata": {"purpose": "bench"}})),
        )
        .await?;
    sb["id"]
        .as_str()
        .map(str::to_string)
        .context("create answered no id")
}

async fn exec_true(c: &Client, id: &str) -> Result<()> {
    let r = c
        .json(
            Method::POST,
            &format!("/api/v1/sandboxes/{id}/exec"),
            Some(&json!({"command": "true", "mode": "argv"})),
        )
        .await?;
    if r["exit_code"].as_i64() != Some(0) {
        bail!("exec true answered {r}");
    }
    Ok(())
}

/// Per provider: exec round trips (ms), uploads and downloads (MiB/s).
type ProviderSeries = (String, Vec<f64>, Vec<f64>, Vec<f64>);

struct Row {
    name: String,
    unit: &'static str,
    ours: Stats,
    peer_name: String,
    peer: Stats,
    /// true: lower is better (latency, memory); false: higher is better.
    lower_better: bool,
}

impl Row {
    fn ratio(&self) -> f64 {
        if self.lower_better {
            self.peer.p50 / self.ours.p50
        } else {
            self.ours.p50 / self.peer.p50
        }
    }
}

fn row(
    name: String,
    unit: &'static str,
    ours: &[f64],
    peer_name: &str,
    peer: &[f64],
    lower_better: bool,
) -> Row {
    Row {
        name,
        unit,
        ours: stats(&mut ours.to_vec(), lower_better),
        peer_name: peer_name.to_string(),
        peer: stats(&mut peer.to_vec(), lower_better),
        lower_better,
    }
}

async fn destroy(c: &Client, id: &str) -> Result<()> {
    c.json(Method::DELETE, &format!("/api/v1/sandboxes/{id}"), None)
        .await
        .map(|_| ())
}

/// Round trips of `exec true` through the API.
async fn exec_series(c: &Client, id: &str, n: usize) -> Result<Vec<f64>> {
    for _ in 0..20 {
        exec_true(c, id).await?;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        exec_true(c, id).await?;
        out.push(ms(t.elapsed()));
    }
    Ok(out)
}

/// create → first exec → (untimed) destroy, `n` times.
async fn create_series(c: &Client, image: &str, provider: &str, n: usize) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let id = create(c, image, provider).await?;
        exec_true(c, &id).await?;
        out.push(ms(t.elapsed()));
        destroy(c, &id).await?;
    }
    Ok(out)
}

/// Ready sandboxes in a template's warm pool.
async fn pool_ready(c: &Client, name: &str) -> Result<u64> {
    let st = c.json(Method::GET, "/api/v1/pool/status", None).await?;
    Ok(st["templates"][name]["ready"].as_u64().unwrap_or(0))
}

/// Spawn from a template with a warm pool (its refill waited for, untimed)
/// and plain creates of the same image, `n` times each; ms to the 201.
async fn template_spawn_series(
    c: &Client,
    image: &str,
    provider: &str,
    n: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let name = format!("bench-warm-{}", std::process::id());
    let pool = 4;
    c.json(
        Method::POST,
        "/api/v1/templates",
        Some(&json!({"name": name, "image": image, "provider": provider, "ttl": "15m", "pool_size": pool})),
    )
    .await?;
    let result = async {
        let wait_ready = |min: u64| {
            let name = name.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(120);
                while pool_ready(c, &name).await? < min {
                    if Instant::now() > deadline {
                        bail!("the warm pool of {name} did not fill");
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok::<(), anyhow::Error>(())
            }
        };
        wait_ready(pool).await?;
        let (mut warm, mut plain) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for _ in 0..n {
            wait_ready(1).await?;
            let t = Instant::now();
            let sb = c
                .json(
                    Method::POST,
                    &format!("/api/v1/templates/{name}/spawn"),
                    None,
                )
                .await?;
            warm.push(ms(t.elapsed()));
            destroy(c, sb["id"].as_str().context("spawn answered no id")?).await?;
            let t = Instant::now();
            let id = create(c, image, provider).await?;
            plain.push(ms(t.elapsed()));
            destroy(c, &id).await?;
        }
        Ok((warm, plain))
    }
    .await;
    let _ = c
        .json(Method::DELETE, &format!("/api/v1/templates/{name}"), None)
        .await;
    result
}

/// Upload and download `data` `n` times each; MiB/s.
async fn transfer_series(
    c: &Client,
    id: &str,
    data: &Bytes,
    n: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let mib = data.len() as f64 / (1024.0 * 1024.0);
    let path = "/tmp/stacyvm-bench.bin";
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let t = Instant::now();
        let resp = Client::check(
            c.send(
                Method::PUT,
                &format!("/api/v1/sandboxes/{id}/files/raw?path={}", enc(path)),
                full(data.clone()),
                false,
            )
            .await?,
        )
        .await?;
        resp.into_body().collect().await?;
        up.push(mib / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let resp = Client::check(
            c.send(
                Method::GET,
                &format!("/api/v1/sandboxes/{id}/files?path={}", enc(path)),
                empty(),
                false,
            )
            .await?,
        )
        .await?;
        let got = resp.into_body().collect().await?.to_bytes();
        down.push(mib / t.elapsed().as_secs_f64());
        if got != *data {
            bail!("downloaded file differs from the uploaded one");
        }
    }
    Ok((up, down))
}

fn random_bytes(size: usize) -> Bytes {
    let mut data = vec![0u8; size];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    Bytes::from(data)
}

/// Host memory in use (MemTotal - MemAvailable), in MiB.
fn host_mem_used_mib() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let field = |name: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    match (field("MemTotal:"), field("MemAvailable:")) {
        (Some(t), Some(a)) => Ok((t - a) / 1024.0),
        _ => bail!("cannot read MemTotal/MemAvailable from /proc/meminfo"),
    }
}

/// Memory per idle sandbox: create `n` (each runs one exec), let them
/// settle, then measure (a) the memory charged to their cgroups (the
/// agent's `stats`: RSS, page cache and kernel objects of the sandbox) and
/// (b) the growth of host memory in use (MemTotal - MemAvailable; includes
/// everything, and the noise of whatever else runs on the host). Destroys
/// them afterwards.
async fn idle_memory(c: &Client, image: &str, provider: &str, n: usize) -> Result<(f64, f64)> {
    let sample = || -> Result<f64> {
        let mut v = [
            host_mem_used_mib()?,
            host_mem_used_mib()?,
            host_mem_used_mib()?,
        ];
        v.sort_by(|a, b| a.total_cmp(b));
        Ok(v[1])
    };
    let before = sample()?;
    let mut ids = Vec::with_capacity(n);
    let res = async {
        for _ in 0..n {
            let id = create(c, image, provider).await?;
            ids.push(id.clone());
            exec_true(c, &id).await?;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = sample()?;
        let mut charged = 0.0;
        for id in &ids {
            let st = c
                .json(Method::GET, &format!("/api/v1/sandboxes/{id}/stats"), None)
                .await?;
            charged += st["mem_bytes"].as_f64().unwrap_or(0.0);
        }
        Ok::<_, anyhow::Error>((charged / (1024.0 * 1024.0), after))
    }
    .await;
    for id in &ids {
        let _ = destroy(c, id).await;
    }
    let (charged, after) = res?;
    Ok((charged / n as f64, ((after - before) / n as f64).max(0.0)))
}

fn run_peer(program: &str, args: &[&str]) -> Result<Duration> {
    let t = Instant::now();
    let out = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {program} (peer measurement)"))?;
    let d = t.elapsed();
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(d)
}

/// The image's root filesystem as one directory, for the raw launch peers.
fn peer_rootfs(image_dir: &std::path::Path, image: &str) -> Result<PathBuf> {
    let store =
        stacyvm_images::ImageStore::open(image_dir, stacyvm_images::StoreOptions::default())?;
    let info = store.get(image)?.with_context(|| {
        format!(
            "image {image} is not in the image store {}",
            image_dir.display()
        )
    })?;
    // Single-layer images are the common case for this measurement; with
    // several layers the bottom one holds /bin/true.
    info.layers.first().cloned().context("image has no layers")
}

/// The app whose previews are measured: HTTP/1.1 keep-alive, 1 KiB answers.
const PREVIEW_APP: &str = r#"
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
BODY = b"x" * 1024
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def log_message(self, *a):
        pass
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

/// The client, run inside the sandbox (direct) and on the host (proxy):
/// argv host port host-header token n mode; prints per-request ms as JSON.
/// mode `keepalive`: one connection; `close`: a new connection per request.
const PREVIEW_CLIENT: &str = r#"
import http.client, json, sys, time
host, port, hh, token, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6]
headers = {"Host": hh}
if token:
    headers["X-Preview-Token"] = token
conn = None
def get():
    global conn
    if conn is None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
    h = dict(headers)
    if mode == "close":
        h["Connection"] = "close"
    conn.request("GET", "/", headers=h)
    r = conn.getresponse()
    body = r.read()
    assert r.status == 200 and len(body) == 1024, (r.status, body[:200])
    if mode == "close":
        conn.close()
        conn = None
for _ in range(min(50, n)):
    get()
out = []
for _ in range(n):
    t = time.perf_counter()
    get()
    out.append((time.perf_counter() - t) * 1000)
print(json.dumps(out))
"#;

const PREVIEW_PORT: u16 = 8080;

async fn exec_ok(c: &Client, id: &str, command: &str, timeout: &str) -> Result<String> {
    let r = c
        .json(
            Method::POST,
            &format!("/api/v1/sandboxes/{id}/exec"),
            Some(&json!({"command": command, "timeout": timeout})),
        )
        .await?;
    if r["exit_code"].as_i64() != Some(0) {
        bail!("`{command}` in the sandbox failed: {r}");
    }
    Ok(r["stdout"].as_str().unwrap_or_default().to_string())
}

fn parse_samples(out: &str) -> Result<Vec<f64>> {
    serde_json::from_str(out.trim()).with_context(|| format!("client printed {out:?}"))
}

/// Per-request latency (ms) of the same GET fetched directly inside the
/// sandbox and through the preview proxy: (direct, proxied) per mode.
async fn preview_series(
    c: &Client,
    url: &str,
    image: &str,
    n: usize,
) -> Result<Vec<(&'static str, Vec<f64>, Vec<f64>)>> {
    // Every host CPU, so that the in-sandbox client is not slowed by the
    // sandbox's CPU quota (the proxied client runs on the host).
    let vcpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sb = c
        .json(
            Method::POST,
            "/api/v1/sandboxes",
            Some(
                &json!({"image": image, "provider": "native", "ttl": "15m", "vcpus": vcpus,
                "metadata": {"purpose": "bench"}}),
            ),
        )
        .await?;
    let id = sb["id"]
        .as_str()
        .context("create answered no id")?
        .to_string();
    let res = async {
        for (path, content) in [
            ("/workspace/bench_app.py", PREVIEW_APP),
            ("/workspace/bench_client.py", PREVIEW_CLIENT),
        ] {
            c.json(
                Method::POST,
                &format!("/api/v1/sandboxes/{id}/files"),
                Some(&json!({"path": path, "content": content})),
            )
            .await?;
        }
        exec_ok(
            c,
            &id,
            &format!(
                "nohup python3 /workspace/bench_app.py {PREVIEW_PORT} >/tmp/app.log 2>&1 & \
                 for i in $(seq 100); do python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", {PREVIEW_PORT}), 1)' 2>/dev/null && exit 0; sleep 0.1; done; exit 1"
            ),
            "30s",
        )
        .await?;
        let g = c
            .json(
                Method::GET,
                &format!("/api/v1/sandboxes/{id}/preview/{PREVIEW_PORT}"),
                None,
            )
            .await?;
        let token = g["token"].as_str().unwrap_or_default().to_string();
        let preview_host = g["url"]
            .as_str()
            .and_then(|u| u.strip_prefix("http://"))
            .context("preview grant without url")?
            .to_string();
        // The proxy is reached on the server's own address, by Host.
        let server = url
            .strip_prefix("http://")
            .context("the bench target must be an http:// URL")?;
        let (shost, sport) = server
            .trim_end_matches('/')
            .rsplit_once(':')
            .context("the bench target needs a port")?;
        let client_path = std::env::temp_dir().join(format!("stacyvm-bench-{}.py", std::process::id()));
        std::fs::write(&client_path, PREVIEW_CLIENT)?;
        let mut out = Vec::new();
        for mode in ["keepalive", "close"] {
            let direct = exec_ok(
                c,
                &id,
                &format!(
                    "python3 /workspace/bench_client.py 127.0.0.1 {PREVIEW_PORT} localhost:{PREVIEW_PORT} '' {n} {mode}"
                ),
                "10m",
            )
            .await?;
            let proxied = Command::new("python3")
                .arg(&client_path)
                .args([shost, sport, &preview_host, &token, &n.to_string(), mode])
                .stderr(Stdio::inherit())
                .output()
                .context("running python3 on the host (preview client)")?;
            if !proxied.status.success() {
                bail!("the preview client on the host failed");
            }
            out.push((
                mode,
                parse_samples(&direct)?,
                parse_samples(&String::from_utf8_lossy(&proxied.stdout))?,
            ));
        }
        let _ = std::fs::remove_file(&client_path);
        Ok::<_, anyhow::Error>(out)
    }
    .await;
    let _ = destroy(c, &id).await;
    res
}

pub async fn run(a: BenchArgs, api_key: Option<String>) -> Result<i32> {
    let cfg = stacyvm_core::Config::load(None, std::env::vars())?;
    let image_dir = cfg.image_dir();
    let (_own, url) = match &a.target {
        Some(u) => (None, u.clone()),
        None => {
            let data_dir = std::env::temp_dir().join(format!("svm-bench-{}", std::process::id()));
            let opts = ServerOptions {
                api_key: api_key.clone(),
                ..ServerOptions::new(data_dir)
            }
            .env("STACYVM_IMAGE_DIR", image_dir.to_string_lossy())
            .env("STACYVM_MAX_SANDBOXES", "2000");
            let s = OwnServer::start(opts)
                .await
                .context("starting the benchmark server")?;
            let u = s.url().to_string();
            (Some(s), u)
        }
    };
    let c = Client::new(&url, api_key.clone())?;
    let has = |p: &str| a.providers.iter().any(|x| x == p);
    eprintln!(
        "benchmarking {url} (image {}, providers {})",
        a.image,
        a.providers.join(",")
    );
    let mut rows: Vec<Row> = Vec::new();
    let mut keep: Vec<String> = Vec::new();
    let result = async {
        let data = random_bytes(a.transfer_mib * 1024 * 1024);
        // One long-lived sandbox per provider for exec and transfers.
        let mut exec: Vec<ProviderSeries> = Vec::new();
        for p in &a.providers {
            let id = create(&c, &a.image, p).await?;
            keep.push(id.clone());
            let e = exec_series(&c, &id, a.exec_iterations).await?;
            let (up, down) = transfer_series(&c, &id, &data, a.transfer_iterations).await?;
            exec.push((p.clone(), e, up, down));
            eprintln!("  {p}: exec and transfers done");
        }
        // Docker CLI peers on the Docker sandbox's container.
        let docker_id = a
            .providers
            .iter()
            .position(|p| p == "docker")
            .map(|i| keep[i].clone());
        let (mut dexec, mut dup, mut ddown) = (Vec::new(), Vec::new(), Vec::new());
        if let Some(id) = &docker_id {
            let container = format!("stacyvm-{id}");
            docker(&["exec", &container, "true"])?;
            for _ in 0..a.docker_exec_iterations {
                dexec.push(ms(docker(&["exec", &container, "true"])?));
            }
            let mib = a.transfer_mib as f64;
            let local =
                std::env::temp_dir().join(format!("stacyvm-bench-{}.bin", std::process::id()));
            let back =
                std::env::temp_dir().join(format!("stacyvm-bench-{}.back", std::process::id()));
            std::fs::write(&local, &data)?;
            let target = format!("{container}:/tmp/stacyvm-bench-peer.bin");
            let (l, b) = (
                local.to_string_lossy().to_string(),
                back.to_string_lossy().to_string(),
            );
            for _ in 0..a.transfer_iterations {
                dup.push(mib / docker(&["cp", &l, &target])?.as_secs_f64());
                ddown.push(mib / docker(&["cp", &target, &b])?.as_secs_f64());
                let _ = std::fs::remove_file(&back);
            }
            let _ = std::fs::remove_file(&local);
            eprintln!("  docker CLI peers done");
        }
        let docker_exec_api = exec.iter().find(|e| e.0 == "docker").map(|e| e.1.clone());
        for (p, e, up, down) in &exec {
            if !dexec.is_empty() {
                rows.push(row(
                    format!("exec round trip [{p}]"),
                    "ms",
                    e,
                    "docker exec",
                    &dexec,
                    true,
                ));
            }
            if p == "native" {
                if let Some(d) = &docker_exec_api {
                    rows.push(row(
                        format!("exec round trip [{p}]"),
                        "ms",
                        e,
                        "docker provider",
                        d,
                        true,
                    ));
                }
            }
            if !dup.is_empty() {
                rows.push(row(
                    format!("upload 64 MiB [{p}]"),
                    "MiB/s",
                    up,
                    "docker cp in",
                    &dup,
                    false,
                ));
                rows.push(row(
                    format!("download 64 MiB [{p}]"),
                    "MiB/s",
                    down,
                    "docker cp out",
                    &ddown,
                    false,
                ));
            }
        }

        // create → first exec.
        let mut create_docker = Vec::new();
        if has("docker") {
            create_docker =
                create_series(&c, &a.image, "docker", a.docker_create_iterations).await?;
            let mut run = Vec::new();
            for _ in 0..a.docker_create_iterations {
                run.push(ms(docker(&[
                    "run",
                    "--rm",
                    "--network",
                    "none",
                    &a.image,
                    "true",
                ])?));
            }
            rows.push(row(
                "create → first exec [docker]".into(),
                "ms",
                &create_docker,
                "docker run --rm",
                &run,
                true,
            ));
            eprintln!("  docker: create → first exec done");
        }
        if has("native") {
            let native = create_series(&c, &a.image, "native", a.create_iterations).await?;
            if !create_docker.is_empty() {
                rows.push(row(
                    "create → first exec [native]".into(),
                    "ms",
                    &native,
                    "docker provider",
                    &create_docker,
                    true,
                ));
            }
            let root = peer_rootfs(&image_dir, &a.image)?;
            let root = root.to_string_lossy().to_string();
            let mut bwrap = Vec::new();
            let mut unshare = Vec::new();
            for _ in 0..a.create_iterations {
                bwrap.push(ms(run_peer(
                    "bwrap",
                    &[
                        "--ro-bind",
                        &root,
                        "/",
                        "--proc",
                        "/proc",
                        "--dev",
                        "/dev",
                        "--unshare-all",
                        "--die-with-parent",
                        "/bin/true",
                    ],
                )?));
                unshare.push(ms(run_peer(
                    "unshare",
                    &[
                        "--mount",
                        "--uts",
                        "--ipc",
                        "--net",
                        "--pid",
                        "--fork",
                        "chroot",
                        &root,
                        "/bin/true",
                    ],
                )?));
            }
            rows.push(row(
                "create → first exec [native]".into(),
                "ms",
                &native,
                "bwrap launch",
                &bwrap,
                true,
            ));
            rows.push(row(
                "create → first exec [native]".into(),
                "ms",
                &native,
                "unshare launch",
                &unshare,
                true,
            ));
            eprintln!("  native: create → first exec done");
        }
        if has("proot") && a.proot_create_iterations > 0 {
            let proot = create_series(&c, &a.image, "proot", a.proot_create_iterations).await?;
            let root = peer_rootfs(&image_dir, &a.image)?;
            let root = root.to_string_lossy().to_string();
            let mut raw = Vec::new();
            for _ in 0..a.proot_create_iterations {
                raw.push(ms(run_peer("proot", &["-r", &root, "/bin/true"])?));
            }
            rows.push(row(
                "create → first exec [proot]".into(),
                "ms",
                &proot,
                "proot launch",
                &raw,
                true,
            ));
            if !create_docker.is_empty() {
                rows.push(row(
                    "create → first exec [proot]".into(),
                    "ms",
                    &proot,
                    "docker provider",
                    &create_docker,
                    true,
                ));
            }
            eprintln!("  proot: create → first exec done");
        }
        // Warm pools and previews are measured on the native provider.
        if has("native") {
            if a.spawn_iterations > 0 {
                let (warm, plain) =
                    template_spawn_series(&c, &a.image, "native", a.spawn_iterations).await?;
                rows.push(row(
                    "spawn from template, warm pool [native]".into(),
                    "ms",
                    &warm,
                    "plain create",
                    &plain,
                    true,
                ));
                eprintln!("  native: warm-pool spawns done");
            }

            if a.preview_iterations > 0 {
                for (mode, direct, proxied) in
                    preview_series(&c, &url, &a.image, a.preview_iterations).await?
                {
                    let what = if mode == "close" {
                        "new connection each"
                    } else {
                        "keep-alive"
                    };
                    let rps = |v: &[f64]| 1000.0 * v.len() as f64 / v.iter().sum::<f64>();
                    let r = row(
                        format!("preview GET 1 KiB, {what} [native]"),
                        "ms",
                        &proxied,
                        "direct in sandbox",
                        &direct,
                        true,
                    );
                    eprintln!(
                        "  preview ({what}): proxy p50 {:.3} ms vs direct {:.3} ms: +{:.3} ms added; {:.0} vs {:.0} req/s (sequential)",
                        r.ours.p50,
                        r.peer.p50,
                        r.ours.p50 - r.peer.p50,
                        rps(&proxied),
                        rps(&direct)
                    );
                    rows.push(r);
                    rows.push(row(
                        format!("preview req/s, {what} [native]"),
                        "req/s",
                        &[rps(&proxied)],
                        "direct in sandbox",
                        &[rps(&direct)],
                        false,
                    ));
                }
                eprintln!("  native: preview proxy done");
            }

            if a.idle_sandboxes > 0 {
                let (charged, host) = idle_memory(&c, &a.image, "native", a.idle_sandboxes).await?;
                let n = a.idle_sandboxes;
                let (dcharged, dhost, peer) = if has("docker") && a.idle_docker_sandboxes > 0 {
                    let (dc, dh) =
                        idle_memory(&c, &a.image, "docker", a.idle_docker_sandboxes).await?;
                    (dc, dh, format!("docker (n={})", a.idle_docker_sandboxes))
                } else {
                    (f64::NAN, f64::NAN, "-".to_string())
                };
                rows.push(row(
                    format!("cgroup memory / idle sandbox (n={n}) [native]"),
                    "MiB",
                    &[charged],
                    &peer,
                    &[dcharged],
                    true,
                ));
                rows.push(row(
                    format!("host memory / idle sandbox (n={n}) [native]"),
                    "MiB",
                    &[host],
                    &peer,
                    &[dhost],
                    true,
                ));
                eprintln!("  native: idle memory done");
            }
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    for id in &keep {
        let _ = destroy(&c, id).await;
    }
    result?;

    if a.json {
        let v: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({
                    "name": r.name, "unit": r.unit,
                    "ours": {"p50": r.ours.p50, "p99": r.ours.p99, "mean": r.ours.mean, "n": r.ours.n},
                    "peer": {"name": r.peer_name, "p50": r.peer.p50, "p99": r.peer.p99, "mean": r.peer.mean, "n": r.peer.n},
                    "ratio": r.ratio(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{:<44} {:>13} {:>13}   {:<18} {:>13} {:>13}   {:>8}",
            "benchmark", "p50", "p99/p1", "peer", "peer p50", "peer p99/p1", "ratio"
        );
        for r in &rows {
            let f = |v: f64| {
                if v.is_nan() {
                    "-".to_string()
                } else {
                    format!("{v:.2} {}", r.unit)
                }
            };
            println!(
                "{:<44} {:>13} {:>13}   {:<18} {:>13} {:>13}   {:>7.1}x",
                r.name,
                f(r.ours.p50),
                f(r.ours.p99),
                r.peer_name,
                f(r.peer.p50),
                f(r.peer.p99),
                r.ratio()
            );
        }
        println!("(ratio: how many times better than the peer at the median; p99 of latencies, p1 (slowest run) of throughputs)");
    }
    Ok(0)
}
