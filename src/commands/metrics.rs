//! `copy --metrics ADDR`: Prometheus metrics of the migration over HTTP (`GET /metrics`), read
//! from the state on green at each scrape (what `status --format json` shows), so they hold for
//! the whole migration, `cutover` included, however many processes take part. Read-only: control
//! goes through `migrate control`, which needs green's credentials.

use std::fmt::Write;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::Client;

use crate::{
    error::{Error, Result},
    plan::Plan,
};

/// Binds `addr` (failing at once when it cannot) and serves scrapes until the process ends.
pub async fn spawn(plan: &Plan, addr: &str) -> Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Usage(format!("--metrics {addr}: cannot listen there: {e}")))?;
    tracing::info!(address = %addr, "serving metrics at /metrics");
    let plan = plan.clone();
    Ok(tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: do not spin.
                    tracing::warn!(error = %e, "metrics: accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                }
            };
            // Each scrape on its own, bounded in time: a client that sends nothing or reads
            // nothing holds only itself.
            let plan = plan.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(SCRAPE_WAIT, serve(&plan, stream)).await;
            });
        }
    }))
}

/// The most a scrape may take (Prometheus' default timeout is 10 s).
const SCRAPE_WAIT: std::time::Duration = std::time::Duration::from_secs(9);

/// Answers one HTTP request.
async fn serve(plan: &Plan, mut stream: tokio::net::TcpStream) {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    while len < buf.len() {
        let n = stream.read(&mut buf[len..]).await.unwrap_or(0);
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let request = String::from_utf8_lossy(&buf[..len]);
    let line = request.lines().next().unwrap_or("");
    let (status, body) = if line.starts_with("GET /metrics ") || line == "GET /metrics" {
        let green = plan.green.connect().await.ok();
        // Blue only for what capture holds there: not worth a scrape's time while it is down.
        let blue = tokio::time::timeout(std::time::Duration::from_secs(2), plan.blue.connect())
            .await
            .ok()
            .and_then(|r| r.ok());
        match scrape(plan, green.as_ref(), blue.as_ref()).await {
            Ok(text) => ("200 OK", text),
            Err(e) => ("503 Service Unavailable", format!("# green unreadable: {e}\n")),
        }
    } else {
        ("404 Not Found", "only /metrics is served\n".to_string())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn scrape(plan: &Plan, green: Option<&Client>, blue: Option<&Client>) -> Result<String> {
    let green = green.ok_or_else(|| Error::Usage("green does not answer".into()))?;
    let retention = match blue {
        Some(b) => crate::capture::blue_retention(plan, b).await.unwrap_or_default(),
        None => serde_json::Value::Null,
    };
    let report = super::status::report(plan, green, retention).await?;
    Ok(render(&report))
}

/// The status report in Prometheus' text format.
pub fn render(r: &serde_json::Value) -> String {
    let plan = label(r["plan"].as_str().unwrap_or(""));
    let mut o = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, Option<f64>)>| {
        let samples: Vec<(String, f64)> = samples.into_iter().filter_map(|(l, v)| Some((l, v?))).collect();
        if samples.is_empty() {
            return;
        }
        let _ = writeln!(o, "# HELP bluegreen_{name} {help}\n# TYPE bluegreen_{name} {kind}");
        for (labels, v) in samples {
            let sep = if labels.is_empty() { "" } else { "," };
            let _ = writeln!(o, "bluegreen_{name}{{plan=\"{plan}\"{sep}{labels}}} {v}");
        }
    };
    let one = |v: &serde_json::Value| v.as_f64();
    let flag = |v: &serde_json::Value| Some(if v == true { 1.0 } else { 0.0 });
    let phase = r["phase"].as_str().unwrap_or("planned");
    metric(
        "phase",
        "gauge",
        "1 for the migration's current phase.",
        vec![(format!("phase=\"{}\"", label(phase)), Some(1.0))],
    );
    let tables = r["tables"].as_array().cloned().unwrap_or_default();
    let per_table = |field: &str| -> Vec<(String, Option<f64>)> {
        tables
            .iter()
            .map(|t| (format!("table=\"{}\"", label(t["table"].as_str().unwrap_or(""))), t[field].as_f64()))
            .collect()
    };
    metric("rows_copied", "gauge", "Rows copied to green per table.", per_table("rows_copied"));
    metric("rows_estimated", "gauge", "Rows on blue per table, from blue's statistics.", per_table("rows_estimated"));
    metric("chunks_done", "gauge", "Chunks copied per table.", per_table("chunks_done"));
    metric("chunks", "gauge", "Chunks planned per table.", per_table("chunks"));
    let c = &r["capture"];
    metric(
        "capture_lag_bytes",
        "gauge",
        "Blue WAL not yet applied on green.",
        vec![(String::new(), one(&c["lag_bytes"]))],
    );
    metric(
        "capture_lag_seconds",
        "gauge",
        "How far behind blue green is, in time.",
        vec![(String::new(), one(&c["lag_seconds"]))],
    );
    metric(
        "pending_keys",
        "gauge",
        "Captured keys waiting to be applied.",
        vec![(String::new(), one(&c["pending_keys"]))],
    );
    metric(
        "applied_keys_total",
        "counter",
        "Keys applied to green by the follower.",
        vec![(String::new(), one(&c["applied_keys"]))],
    );
    metric(
        "apply_keys_per_second",
        "gauge",
        "Keys applied per second lately.",
        vec![(String::new(), one(&c["apply_keys_per_second"]))],
    );
    metric(
        "follower_seen_seconds_ago",
        "gauge",
        "Seconds since the follower last reported.",
        vec![(String::new(), one(&c["follower_seen_seconds_ago"]))],
    );
    metric(
        "blue_retained_bytes",
        "gauge",
        "What capture holds on blue (slot WAL or change table).",
        vec![(String::new(), one(&r["blue"]["retained_bytes"]))],
    );
    let v = &r["last_verify"];
    if v.is_object() {
        metric(
            "last_verify_equal",
            "gauge",
            "1 when the last verify found both sides equal.",
            vec![(String::new(), flag(&v["equal"]))],
        );
    }
    let k = &r["cutover"];
    if k.is_object() {
        let outcome = label(k["outcome"].as_str().unwrap_or("unknown"));
        metric(
            "cutover_paused_milliseconds",
            "gauge",
            "How long the last cutover held traffic paused.",
            vec![(format!("outcome=\"{outcome}\""), one(&k["paused_ms"]))],
        );
        metric(
            "cutover_total_milliseconds",
            "gauge",
            "How long the last cutover took in all.",
            vec![(format!("outcome=\"{outcome}\""), one(&k["total_ms"]))],
        );
    }
    let ctl = &r["control"];
    metric(
        "control_paused",
        "gauge",
        "1 while `migrate control pause` holds.",
        vec![(String::new(), flag(&ctl["paused"]))],
    );
    metric(
        "control_rows_per_second",
        "gauge",
        "The copy rate `migrate control throttle` set (0: the plan's).",
        vec![(String::new(), Some(ctl["rows_per_second"].as_f64().unwrap_or(0.0)))],
    );
    metric(
        "control_postponed",
        "gauge",
        "1 while a cutover is postponed.",
        vec![(String::new(), flag(&ctl["postponed"]))],
    );
    metric(
        "failed",
        "gauge",
        "1 when the last run failed (status shows the error).",
        vec![(String::new(), flag(&serde_json::json!(r["last_error"].is_object())))],
    );
    metric(
        "drifted_tables",
        "gauge",
        "Tables whose drift stopped following.",
        vec![(String::new(), Some(r["drift"].as_array().map_or(0, Vec::len) as f64))],
    );
    let w = &r["way_back"];
    metric(
        "way_back_open",
        "gauge",
        "1 while a way back is open (green's writes are carried to blue).",
        vec![(String::new(), flag(&w["open"]))],
    );
    metric(
        "way_back_pending_changes",
        "gauge",
        "Changes on green not yet on blue.",
        vec![(String::new(), w["pending_changes"].as_f64())],
    );
    metric(
        "way_back_lag_bytes",
        "gauge",
        "Green WAL written since the oldest change not yet on blue.",
        vec![(String::new(), w["lag_bytes"].as_f64())],
    );
    metric(
        "way_back_applied_keys",
        "gauge",
        "Keys written back to blue in the open window.",
        vec![(String::new(), w["applied"].as_f64())],
    );
    o
}

/// A label value escaped as the text format wants.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_report_in_prometheus_text() {
        let report = serde_json::json!({
            "plan": "oauth \"v2\"",
            "phase": "switched",
            "tables": [{"table": "public.t", "rows_copied": 10, "rows_estimated": 12, "chunks_done": 1, "chunks": 2}],
            "capture": {"lag_bytes": 0, "lag_seconds": null, "pending_keys": 3, "applied_keys": 40},
            "last_verify": {"equal": true},
            "cutover": {"outcome": "switched", "paused_ms": 12.5, "total_ms": 300.0},
            "control": {"paused": false, "rows_per_second": 500, "postponed": true},
            "last_error": null,
            "drift": [],
            "blue": null,
        });
        let m = render(&report);
        let plan = "plan=\"oauth \\\"v2\\\"\"";
        for line in [
            format!("bluegreen_phase{{{plan},phase=\"switched\"}} 1"),
            format!("bluegreen_rows_copied{{{plan},table=\"public.t\"}} 10"),
            format!("bluegreen_capture_lag_bytes{{{plan}}} 0"),
            format!("bluegreen_pending_keys{{{plan}}} 3"),
            format!("bluegreen_applied_keys_total{{{plan}}} 40"),
            format!("bluegreen_last_verify_equal{{{plan}}} 1"),
            format!("bluegreen_cutover_paused_milliseconds{{{plan},outcome=\"switched\"}} 12.5"),
            format!("bluegreen_control_rows_per_second{{{plan}}} 500"),
            format!("bluegreen_control_postponed{{{plan}}} 1"),
            format!("bluegreen_failed{{{plan}}} 0"),
        ] {
            assert!(m.lines().any(|l| l == line), "{line} missing from:\n{m}");
        }
        // Unknown values are left out, not reported as 0.
        assert!(!m.contains("bluegreen_capture_lag_seconds{"), "{m}");
        assert!(m.contains("# TYPE bluegreen_applied_keys_total counter"), "{m}");
    }
}
