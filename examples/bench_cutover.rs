//! Cutover benchmark: the longest stall the application sees and the writes that fail during a
//! cutover through PgBouncer, at 300 and 1000 writes/s, against the floor measured in the same
//! run (the same PAUSE / RELOAD / RESUME done by hand, with nothing to drain or check).
//!
//! `cargo run --release --example bench_cutover [rows] [runs]`

use std::time::Duration;

use bluegreen::{copy::Shutdown, demo};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> bluegreen::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rows: u32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let runs: u32 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    let mut lines = Vec::new();
    for rate in [300, 1000] {
        for run in 1..=runs {
            let (_, r) = demo::run(rows, rate, Shutdown::manual()).await?;
            lines.push(format!(
                "{rate:>5} writes/s  run {run}: stall {:>6.1} ms  floor {:>5.1} ms  ratio {:>4.1}x  failed {}  lost {}  acked {}",
                ms(r.cutover_stall),
                ms(r.floor_stall),
                ms(r.cutover_stall) / ms(r.floor_stall).max(0.1),
                r.failed,
                r.lost,
                r.acknowledged
            ));
        }
    }
    println!("\ncutover benchmark ({rows} access tokens, PgBouncer transaction pooling)");
    for l in lines {
        println!("{l}");
    }
    Ok(())
}
