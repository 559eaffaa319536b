//! Exec: exit codes, output streams, stdin, env, workdir, argv mode,
//! timeouts that kill the whole process tree, missing commands.

use super::{snippet, Ctx};
use anyhow::{bail, Result};
use serde_json::json;
use std::time::{Duration, Instant};

pub(super) async fn exit_codes(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    for code in [0, 1, 42] {
        let out = c.sh(&id, &format!("exit {code}"), "10s").await?;
        if out.exit_code != code {
            bail!("`exit {code}` answered {}", out.describe());
        }
    }
    Ok("exit 0, 1, 42 answered as 200 with those codes".into())
}

pub(super) async fn stdout_stderr(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let out = c
        .sh(&id, "echo to-out; echo to-err >&2; echo more-out", "10s")
        .await?;
    if out.stdout != "to-out\nmore-out\n" || out.stderr != "to-err\n" || out.exit_code != 0 {
        bail!("{}", out.describe());
    }
    Ok("stdout and stderr kept apart".into())
}

pub(super) async fn stdin(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let input = "line one\nline two ✓\n";
    let out = c
        .exec(
            &id,
            json!({"command": "cat; echo end", "stdin": input, "timeout": "10s"}),
        )
        .await?;
    if out.stdout != format!("{input}end\n") || out.exit_code != 0 {
        bail!("{}", out.describe());
    }
    Ok("stdin delivered and closed".into())
}

pub(super) async fn env(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let value = "a b $c 'd' ✓";
    let out = c
        .exec(
            &id,
            json!({"command": "printf '%s' \"$CERTIFY_VALUE\"", "env": {"CERTIFY_VALUE": value}, "timeout": "10s"}),
        )
        .await?;
    if out.stdout != value || out.exit_code != 0 {
        bail!("{}", out.describe());
    }
    Ok("env variable passed verbatim".into())
}

pub(super) async fn workdir(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let out = c
        .exec(
            &id,
            json!({"command": "pwd", "workdir": "/tmp", "timeout": "10s"}),
        )
        .await?;
    if out.stdout != "/tmp\n" {
        bail!("workdir /tmp: {}", out.describe());
    }
    let out = c.sh(&id, "pwd", "10s").await?;
    if out.stdout != "/workspace\n" {
        bail!("default workdir: {}", out.describe());
    }
    Ok("workdir /tmp honoured; default /workspace".into())
}

pub(super) async fn argv_mode(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let out = c
        .exec(
            &id,
            json!({
                "command": "printf",
                "args": ["%s|", "a b", "$HOME", "; echo injected", "*"],
                "mode": "argv",
                "timeout": "10s",
            }),
        )
        .await?;
    if out.stdout != "a b|$HOME|; echo injected|*|" || out.exit_code != 0 {
        bail!("{}", out.describe());
    }
    Ok("arguments passed without a shell".into())
}

/// A shell script that lists the processes whose command line contains
/// `marker` (without containing the marker itself) and proves that it could
/// read `/proc` by finding its own pid.
fn scan_script(marker: &str) -> String {
    let (head, tail) = marker.split_at(marker.len() / 2);
    format!(
        r#"m="{head}""{tail}"; n=0; me=0; found=""
for d in /proc/[0-9]*; do
  c=$(tr '\0' ' ' < "$d/cmdline" 2>/dev/null) || continue
  n=$((n+1))
  [ "${{d#/proc/}}" = "$$" ] && me=1
  case "$c" in *"$m"*) found="$found [${{d#/proc/}}: $c]";; esac
done
echo "seen=$n me=$me"
echo "found=$found""#
    )
}

/// `sleep 300 & sleep 300` with a 1 s timeout: 408 at the deadline, and no
/// process of it left afterwards (seen from a later exec in the sandbox; the
/// sleeps carry a unique duration as a marker, so this works without a PID
/// namespace too).
pub(super) async fn timeout_kills_tree(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let marker = format!("300.{:09}", nanos.max(1));
    let t = Instant::now();
    let r = c
        .exec_raw(
            &id,
            &json!({"command": format!("sleep {marker} & sleep {marker}; echo not-killed"), "timeout": "1s"}),
        )
        .await?;
    let took = t.elapsed();
    if r.status.as_u16() != 408 || r.code() != "timeout" {
        bail!("expected 408 timeout, got {}", r.describe());
    }
    if took < Duration::from_millis(900) || took > Duration::from_millis(2500) {
        bail!(
            "the 408 came after {:.2}s, not at the 1s deadline",
            took.as_secs_f64()
        );
    }
    let script = scan_script(&marker);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let out = c.sh(&id, &script, "20s").await?;
        let mut lines = out.stdout.lines();
        let seen = lines.next().unwrap_or_default().to_string();
        let found = lines
            .next()
            .and_then(|l| l.strip_prefix("found="))
            .unwrap_or("?")
            .to_string();
        if out.exit_code != 0 || !seen.starts_with("seen=") || !seen.ends_with("me=1") {
            bail!(
                "the process scan inside the sandbox did not work ({})",
                out.describe()
            );
        }
        if found.is_empty() {
            return Ok(format!(
                "408 after {:.2}s; no `sleep {marker}` left ({})",
                took.as_secs_f64(),
                seen
            ));
        }
        if Instant::now() > deadline {
            bail!(
                "408 after {:.2}s, but processes of the timed-out command still run 3s later:{}",
                took.as_secs_f64(),
                snippet(&found)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A command that does not exist exits 127, through the shell and in argv
/// mode.
pub(super) async fn not_found(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let out = c.sh(&id, "certify-no-such-command-x7q", "10s").await?;
    if out.exit_code != 127 {
        bail!("shell mode: {}", out.describe());
    }
    let out = c
        .exec(
            &id,
            json!({"command": "/nonexistent/certify-no-such-command", "mode": "argv", "timeout": "10s"}),
        )
        .await?;
    if out.exit_code != 127 {
        bail!("argv mode: {}", out.describe());
    }
    Ok("127 in shell and argv mode".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_script_does_not_contain_its_marker() {
        let marker = "300.123456789";
        let script = scan_script(marker);
        assert!(!script.contains(marker), "{script}");
        assert!(script.contains("m=\"300.12\"\"3456789\""), "{script}");
    }
}
