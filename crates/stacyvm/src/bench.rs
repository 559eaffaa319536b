//! `stacyvm bench`: latency and throughput of the API against Docker's own
//! CLI measured in the same run, on the same machine and image.
//!
//! Without `--server` it starts a private server (this binary, `serve`) on a
//! loopback port with a temporary data directory, and stops it afterwards.

use crate::client::{empty, enc, full, Client};
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
    /// Image for every sandbox (must exist in the local Docker daemon).
    #[arg(
        long,
        env = "STACYVM_TEST_IMAGE",
        default_value = "stacyvm-test/python:bookworm"
    )]
    image: String,
    #[arg(long, default_value = "docker")]
    provider: String,
    /// Exec round trips through the API.
    #[arg(long, default_value_t = 300)]
    exec_iterations: usize,
    /// `docker exec` round trips (each costs ~100 ms).
    #[arg(long, default_value_t = 30)]
    docker_exec_iterations: usize,
    /// create→first exec iterations (and `docker run` peers).
    #[arg(long, default_value_t = 15)]
    create_iterations: usize,
    /// Size of the transfer test file in MiB.
    #[arg(long, default_value_t = 64)]
    transfer_mib: usize,
    /// Transfer repetitions each way.
    #[arg(long, default_value_t = 3)]
    transfer_iterations: usize,
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

/// A server started for the benchmark; stopped on drop.
struct OwnServer {
    child: std::process::Child,
    data_dir: PathBuf,
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        // SAFETY: kill on a pid we spawned and have not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

async fn start_server(api_key: Option<&str>) -> Result<(OwnServer, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let data_dir = std::env::temp_dir().join(format!("svm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&data_dir)?;
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(data_dir.join("server.log"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .env("STACYVM_LISTEN", format!("127.0.0.1:{port}"))
        .env("STACYVM_DATA_DIR", &data_dir)
        .env("STACYVM_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(k) = api_key {
        cmd.env("STACYVM_API_KEY", k);
    }
    let child = cmd.spawn().context("starting the benchmark server")?;
    let server = OwnServer { child, data_dir };
    let url = format!("http://127.0.0.1:{port}");
    let c = Client::new(&url, api_key.map(str::to_string))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if c.json(Method::GET, "/api/v1/ready", None).await.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            let log =
                std::fs::read_to_string(server.data_dir.join("server.log")).unwrap_or_default();
            bail!("the benchmark server did not become ready:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((server, url))
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

struct Row {
    name: &'static str,
    unit: &'static str,
    ours: Stats,
    peer_name: &'static str,
    peer: Stats,
    /// true: lower is better (latency); false: higher is better (throughput).
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

pub async fn run(a: BenchArgs, api_key: Option<String>) -> Result<i32> {
    let (_own, url) = match &a.target {
        Some(u) => (None, u.clone()),
        None => {
            let (s, u) = start_server(api_key.as_deref()).await?;
            (Some(s), u)
        }
    };
    let c = Client::new(&url, api_key.clone())?;
    eprintln!(
        "benchmarking {url} (image {}, provider {})",
        a.image, a.provider
    );
    let mut rows = Vec::new();
    let mut created: Vec<String> = Vec::new();
    let result = async {
        // 1. Exec round trip vs docker exec on the same container.
        let id = create(&c, &a.image, &a.provider).await?;
        created.push(id.clone());
        for _ in 0..20 {
            exec_true(&c, &id).await?;
        }
        let mut ours = Vec::with_capacity(a.exec_iterations);
        for _ in 0..a.exec_iterations {
            let t = Instant::now();
            exec_true(&c, &id).await?;
            ours.push(ms(t.elapsed()));
        }
        let container = format!("stacyvm-{id}");
        docker(&["exec", &container, "true"])?;
        let mut peer = Vec::new();
        for _ in 0..a.docker_exec_iterations {
            peer.push(ms(docker(&["exec", &container, "true"])?));
        }
        rows.push(Row {
            name: "exec round trip (`true`)",
            unit: "ms",
            ours: stats(&mut ours, true),
            peer_name: "docker exec",
            peer: stats(&mut peer, true),
            lower_better: true,
        });
        eprintln!("  exec round trip done");

        // 2. Create → first exec vs docker run.
        let mut ours = Vec::new();
        for _ in 0..a.create_iterations {
            let t = Instant::now();
            let nid = create(&c, &a.image, &a.provider).await?;
            exec_true(&c, &nid).await?;
            ours.push(ms(t.elapsed()));
            c.json(Method::DELETE, &format!("/api/v1/sandboxes/{nid}"), None)
                .await?;
        }
        let mut peer = Vec::new();
        for _ in 0..a.create_iterations {
            peer.push(ms(docker(&[
                "run",
                "--rm",
                "--network",
                "none",
                &a.image,
                "true",
            ])?));
        }
        rows.push(Row {
            name: "create → first exec",
            unit: "ms",
            ours: stats(&mut ours, true),
            peer_name: "docker run --rm",
            peer: stats(&mut peer, true),
            lower_better: true,
        });
        eprintln!("  create → first exec done");

        // 3. File transfer both ways vs docker cp.
        let size = a.transfer_mib * 1024 * 1024;
        let mut data = vec![0u8; size];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for chunk in data.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        let data = Bytes::from(data);
        let mib = a.transfer_mib as f64;
        let (mut up, mut down) = (Vec::new(), Vec::new());
        let path = "/tmp/stacyvm-bench.bin";
        for _ in 0..a.transfer_iterations {
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
            if got.len() != size || got != data {
                bail!("downloaded file differs from the uploaded one");
            }
        }
        let local = std::env::temp_dir().join(format!("stacyvm-bench-{}.bin", std::process::id()));
        let back = std::env::temp_dir().join(format!("stacyvm-bench-{}.back", std::process::id()));
        std::fs::write(&local, &data)?;
        let (mut peer_up, mut peer_down) = (Vec::new(), Vec::new());
        let target = format!("{container}:/tmp/stacyvm-bench-peer.bin");
        let local_s = local.to_string_lossy().to_string();
        let back_s = back.to_string_lossy().to_string();
        for _ in 0..a.transfer_iterations {
            peer_up.push(mib / docker(&["cp", &local_s, &target])?.as_secs_f64());
            peer_down.push(mib / docker(&["cp", &target, &back_s])?.as_secs_f64());
            let _ = std::fs::remove_file(&back);
        }
        let _ = std::fs::remove_file(&local);
        rows.push(Row {
            name: "upload (PUT files/raw)",
            unit: "MiB/s",
            ours: stats(&mut up, false),
            peer_name: "docker cp in",
            peer: stats(&mut peer_up, false),
            lower_better: false,
        });
        rows.push(Row {
            name: "download (GET files)",
            unit: "MiB/s",
            ours: stats(&mut down, false),
            peer_name: "docker cp out",
            peer: stats(&mut peer_down, false),
            lower_better: false,
        });
        eprintln!("  transfers done");
        Ok::<(), anyhow::Error>(())
    }
    .await;
    for id in &created {
        let _ = c
            .json(Method::DELETE, &format!("/api/v1/sandboxes/{id}"), None)
            .await;
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
            "{:<26} {:>14} {:>14}   {:<16} {:>14} {:>14}   {:>8}",
            "benchmark", "p50", "p99/p1", "peer", "peer p50", "peer p99/p1", "ratio"
        );
        for r in &rows {
            let f = |v: f64| format!("{v:.2} {}", if r.unit == "ms" { "ms" } else { "MiB/s" });
            println!(
                "{:<26} {:>14} {:>14}   {:<16} {:>14} {:>14}   {:>7.1}x",
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
