//! Steering and watching a running migration: Prometheus metrics scraped from `copy --metrics`
//! while it copies under writes (rows and lag moving), `migrate control` pausing and throttling
//! the copy (its rate measured from the metrics), a postponed cutover waiting until
//! `unpostpone`, and `status --watch` refreshing.

use std::{
    io::{Read, Write},
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    capture::{caught_up, wait_for},
    support::{green_cluster, run, writer::Writer, Oauth},
};

/// `GET /metrics` from `port`; `None` while nothing listens there.
fn try_scrape(port: u16) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    Some(out)
}

fn scrape(port: u16) -> String {
    try_scrape(port).expect("the metrics endpoint answers")
}

/// The sum of a metric's samples.
fn value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("bluegreen_{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Rows copied per second over `window`, from the metrics; `behind` keeps the most green was
/// seen behind blue (lag bytes and pending keys).
fn copy_rate(port: u16, window: Duration, behind: &mut f64) -> f64 {
    let first = scrape(port);
    std::thread::sleep(window);
    let last = scrape(port);
    for m in [&first, &last] {
        *behind = behind.max(value(m, "capture_lag_bytes") + value(m, "pending_keys"));
    }
    (value(&last, "rows_copied") - value(&first, "rows_copied")) / window.as_secs_f64()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn control(s: &Oauth, plan: &std::path::Path, args: &[&str]) -> String {
    let mut all = vec!["control", plan.to_str().unwrap()];
    all.extend_from_slice(args);
    let r = run(&mut s.migrate(&all));
    assert_eq!(r.code, 0, "{r:?}");
    r.stdout
}

#[test]
fn metrics_pause_throttle_and_postpone_steer_a_running_migration() {
    let s = Oauth::new(20_000);
    let (bouncer, section) = s.bouncer();
    let text = Oauth::plan_text().replace(
        "workers = 2\nchunk_rows = 50000\ndefer_indexes = true",
        "workers = 2\nchunk_rows = 500\ndefer_indexes = true\nmax_rows_per_second = 500",
    );
    let text = format!("{text}\n{section}");
    let plan = s.write_plan(&text);
    let p = plan.to_str().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let writer = Writer::start(s.blue.url(), Duration::from_millis(2));
    let mut copy = s.spawn(&["copy", p, "--metrics", &addr]);

    // The endpoint answers once the copy started; rows move at about the plan's rate.
    let started = Instant::now();
    let mut lag_seen = 0.0f64;
    loop {
        if let Some(m) = try_scrape(port) {
            lag_seen = lag_seen.max(value(&m, "capture_lag_bytes") + value(&m, "pending_keys"));
            if value(&m, "rows_copied") > 0.0 {
                assert!(m.contains("# TYPE bluegreen_rows_copied gauge"), "{m}");
                assert!(m.contains("bluegreen_phase{plan=\""), "{m}");
                break;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no rows copied in the metrics");
        std::thread::sleep(Duration::from_millis(200));
    }
    let planned = copy_rate(port, Duration::from_secs(2), &mut lag_seen);
    assert!(planned > 0.0 && planned < 1000.0, "the plan's 500 rows/s: measured {planned:.0}");

    // Paused: no rows move (after the chunks in flight), status and metrics say so.
    assert!(control(&s, &plan, &["pause"]).contains("paused yes"));
    // The control row is read once a second and chunks in flight finish: wait until the count
    // stands still (it never does when pause does nothing), then watch a full window.
    let started = Instant::now();
    while copy_rate(port, Duration::from_secs(1), &mut lag_seen) > 0.0 {
        assert!(started.elapsed() < Duration::from_secs(30), "rows kept moving 30 s after `pause`");
    }
    let paused = copy_rate(port, Duration::from_secs(2), &mut lag_seen);
    assert_eq!(paused, 0.0, "rows moved while paused");
    let m = scrape(port);
    assert_eq!(value(&m, "control_paused"), 1.0, "{m}");
    let st = run(&mut s.migrate(&["status", p]));
    assert!(st.stdout.contains("control: PAUSED (copy and following)"), "{st:?}");

    // Resumed ten times faster.
    control(&s, &plan, &["resume"]);
    assert!(control(&s, &plan, &["throttle", "5000"]).contains("copy rate 5000 rows/s"));
    // Picked up within a second or two; a loaded machine may take a few windows to show it.
    let started = Instant::now();
    let fast = loop {
        let fast = copy_rate(port, Duration::from_secs(2), &mut lag_seen);
        if fast > 2.0 * planned || started.elapsed() > Duration::from_secs(30) {
            break fast;
        }
    };
    assert!(fast > 2.0 * planned, "throttled up to 5000 rows/s: {fast:.0} rows/s against {planned:.0} before");
    eprintln!("copy rate: {planned:.0} rows/s as planned, 0 paused, {fast:.0} after `throttle 5000`");

    // The follower catches up once the writer stops: lag went up and comes back to 0.
    writer.run_for(Duration::from_secs(1), 100, Duration::from_secs(60));
    let ops = writer.stop();
    assert!(ops > 100, "{ops}");
    std::thread::sleep(Duration::from_secs(2));
    wait_for(&s, &plan, &mut copy, Duration::from_secs(120), "the follower to catch up", caught_up);
    // Other tests' WAL on the shared blue cluster moves the lag between two reads: the metrics
    // must come to zero, not be zero at one instant.
    let started = Instant::now();
    let mut m = scrape(port);
    while value(&m, "capture_lag_bytes") + value(&m, "pending_keys") > 0.0
        && started.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(200));
        m = scrape(port);
    }
    assert!(lag_seen > 0.0, "green was never seen behind blue in the metrics (lag bytes, pending keys)");
    // The sessions `plan` says a copy holds (plus the metrics endpoint's, now open) bound what
    // it holds while following.
    let r = run(&mut s.migrate(&["plan", p]));
    let said =
        r.stdout.lines().find(|l| l.contains("sessions a copy holds")).unwrap_or_else(|| panic!("{r:?}")).to_string();
    let num = |after: &str| -> i64 {
        said.split(after)
            .next()
            .and_then(|x| x.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{said}"))
    };
    let (blue_said, green_said) = (num(" on blue"), num(" on green"));
    let held = |db: &crate::support::TestDb| -> i64 {
        db.psql(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND application_name LIKE 'migrate%'",
            db.name
        ))
        .parse()
        .unwrap()
    };
    let (blue_held, green_held) = (held(&s.blue), held(&s.green));
    eprintln!("sessions: blue {blue_held} held, {blue_said} said; green {green_held} held, {green_said} said");
    assert!(blue_held <= blue_said + 1 && green_held <= green_said + 1, "{said}: blue {blue_held}, green {green_held}");
    assert_eq!(value(&m, "capture_lag_bytes"), 0.0, "{m}");
    assert_eq!(value(&m, "pending_keys"), 0.0, "{m}");
    assert!(value(&m, "rows_copied") >= value(&m, "rows_estimated") * 0.5, "{m}");

    // `status --watch` prints again and again.
    let mut watch =
        s.background(&["status", p, "--watch", "0.3"]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    // Read as it prints (a loaded machine takes longer per refresh), stopped after the third.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = watch.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if line.contains("phase following") {
                let _ = tx.send(());
            }
            out.push_str(&line);
            out.push('\n');
        }
        out
    });
    for _ in 0..3 {
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            break;
        }
    }
    let _ = std::process::Command::new("kill").args(["-INT", &watch.id().to_string()]).status();
    assert!(watch.wait().unwrap().success());
    let out = reader.join().unwrap();
    assert!(out.matches("phase following").count() >= 3, "{out}");

    // A postponed cutover waits (the follower keeps green in step) until unpostponed.
    control(&s, &plan, &["postpone"]);
    let r = run(&mut s.migrate(&["verify", p]));
    assert_eq!(r.code, 0, "{r:?}");
    let mut cutover = s.background(&["cutover", p]).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert!(cutover.try_wait().unwrap().is_none(), "the cutover did not wait while postponed");
    assert!(std::fs::read_to_string(&bouncer.databases_file).unwrap().contains(&s.blue.name));
    assert_eq!(value(&scrape(port), "control_postponed"), 1.0);
    control(&s, &plan, &["unpostpone"]);
    let started = Instant::now();
    let st = loop {
        if let Some(st) = cutover.try_wait().unwrap() {
            break st;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the cutover did not go on once unpostponed");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(st.success(), "cutover: {st}");
    assert!(std::fs::read_to_string(&bouncer.databases_file).unwrap().contains(&s.green.name));
    // The switch ends the follower, and its endpoint with it (the cutover's metrics are covered
    // by the renderer's unit test).
    assert!(copy.wait().unwrap().success());
}

/// `control` needs a migration to steer, and a throttle needs a rate.
#[test]
fn control_refuses_what_it_cannot_do() {
    let s = Oauth::new(2_000);
    let plan = s.write_plan(&Oauth::plan_text());
    let r = run(&mut s.migrate(&["control", plan.to_str().unwrap(), "pause"]));
    assert_eq!(r.code, 2, "{r:?}");
    assert!(r.stderr.contains("green has no state of plan"), "{r:?}");
    let r = run(&mut s.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    let r = run(&mut s.migrate(&["control", plan.to_str().unwrap(), "throttle", "0"]));
    assert_eq!(r.code, 2, "{r:?}");
    // Two at once: each keeps the other's change.
    let both: Vec<_> = [vec!["pause"], vec!["throttle", "700"], vec!["postpone"]]
        .into_iter()
        .map(|a| {
            let mut args = vec!["control".to_string(), plan.to_str().unwrap().to_string()];
            args.extend(a.iter().map(|x| x.to_string()));
            let mut cmd = s.migrate(&[]);
            cmd.args(&args);
            std::thread::spawn(move || run(&mut cmd))
        })
        .collect();
    for h in both {
        assert_eq!(h.join().unwrap().code, 0);
    }
    let r = run(&mut s.migrate(&["control", plan.to_str().unwrap(), "show"]));
    assert!(r.stdout.contains("paused yes  copy rate 700 rows/s  cutover postponed yes"), "{r:?}");
    for a in [vec!["resume"], vec!["unthrottle"], vec!["unpostpone"]] {
        let mut args = vec!["control", plan.to_str().unwrap()];
        args.extend(a);
        assert_eq!(run(&mut s.migrate(&args)).code, 0);
    }
    let r = run(&mut s.migrate(&["control", plan.to_str().unwrap(), "show"]));
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("paused no  copy rate as the plan says  cutover postponed no"), "{r:?}");
    // A cap on the sessions a copy may hold on a side: settings above it are a plan problem.
    let capped = s.write_plan(
        &Oauth::plan_text().replace("defer_indexes = true", "defer_indexes = true\nmax_connections_blue = 5"),
    );
    let r = run(&mut s.migrate(&["plan", capped.to_str().unwrap()]));
    assert_eq!(r.code, 1, "{r:?}");
    assert!(
        r.stdout.contains("a copy under these settings would hold 11 on blue, more than max_connections_blue = 5"),
        "{r:?}"
    );
}

/// `[copy] max_blue_active_sessions`: the copy waits while blue runs more statements of other
/// clients than that, and goes on once they end.
#[test]
fn the_copy_waits_while_blue_is_busy() {
    // A cluster of its own: other tests' sessions on the shared one would count.
    let cluster: &'static crate::support::Cluster = crate::support::Cluster::own("busy", &[]);
    let s = Oauth::on(cluster, green_cluster(), 5_000);
    let text = Oauth::plan_text().replace(
        "workers = 2\nchunk_rows = 50000\ndefer_indexes = true",
        "workers = 2\nchunk_rows = 500\ndefer_indexes = true\nmax_blue_active_sessions = 2",
    );
    let plan = s.write_plan(&text);
    let busy: Vec<std::process::Child> =
        (0..3).map(|_| cluster.psql_cmd(&s.blue.name).args(["-c", "SELECT pg_sleep(8)"]).spawn().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut copy = s.spawn(&["copy", plan.to_str().unwrap(), "--no-follow", "--metrics", &addr]);
    let started = Instant::now();
    while try_scrape(port).is_none() {
        assert!(started.elapsed() < Duration::from_secs(30), "no metrics endpoint");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(value(&scrape(port), "rows_copied"), 0.0, "the copy went on while blue was busy");
    for mut b in busy {
        assert!(b.wait().unwrap().success());
    }
    let st = copy.wait().unwrap();
    assert!(st.success(), "{st}");
    let waited = started.elapsed();
    assert!(waited > Duration::from_secs(6), "the copy ended after {waited:?}, before blue was idle");
}

/// `[copy] max_blue_commit_latency`: the copy waits while a commit on blue takes longer (here a
/// limit no commit meets: the copy is held, and says why).
#[test]
fn the_copy_waits_while_blue_commits_slowly() {
    let s = Oauth::new(2_000);
    let text = Oauth::plan_text().replace(
        "workers = 2\nchunk_rows = 50000\ndefer_indexes = true",
        "workers = 2\nchunk_rows = 500\ndefer_indexes = true\nmax_blue_commit_latency = \"0.001ms\"",
    );
    let plan = s.write_plan(&text);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut copy = s
        .background(&["copy", plan.to_str().unwrap(), "--no-follow", "--metrics", &addr])
        .env("MIGRATE_LOG", "info")
        .spawn()
        .unwrap();
    let started = Instant::now();
    while try_scrape(port).is_none() {
        assert!(started.elapsed() < Duration::from_secs(30), "no metrics endpoint");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(value(&scrape(port), "rows_copied"), 0.0, "the copy went on while blue's commits were slow");
    let _ = Command::new("kill").args(["-INT", &copy.id().to_string()]).status();
    assert!(copy.wait().unwrap().success());
    let mut err = String::new();
    copy.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(
        err.contains("copy waits: a commit on blue took") && err.contains("max_blue_commit_latency = 0.0 ms"),
        "{err}"
    );
}

/// `[copy] max_blue_commit_latency` against a blue whose commits wait for a synchronous
/// standby that is gone (`synchronous_standby_names = 'nobody'` for about 12 s): the copy holds
/// while they wait (no chunk is done), goes on once they commit, and green ends equal to blue
/// under a writer. The timing commit writes WAL, or it would not wait; while it waits no second
/// one is started (one each second would pile up sessions waiting on blue); one that waits for
/// `snapshot_max_age` (here 3 s) is cancelled, as it holds blue's horizon; and once the copy is
/// done, blue is asked nothing more. Before, the timing commit took only an id, committed
/// without waiting, and the copy went on through the stall.
#[test]
fn the_copy_holds_while_blue_commits_wait_for_a_synchronous_standby() {
    let (blue, c, plan) = crate::support::Custom::items_on_own_blue(
        "blue-stall",
        100_000,
        "workers = 1\nchunk_rows = 2000\nmax_rows_per_second = 5000\nmax_blue_commit_latency = \"300ms\"\n\
         snapshot_max_age = \"3s\"",
        "",
    );
    let writer = crate::support::ItemsWriter::start(&c.blue, 100_000);
    let mut leader = c.spawn(&["copy", plan.to_str().unwrap()], &[("MIGRATE_LOG", "warn,bluegreen::control=info")]);
    let state = c.sql("bluegreen_custom");
    let done = || -> i64 {
        let exists = c.green.psql(&format!("SELECT to_regclass('{state}.chunks') IS NOT NULL")) == "t";
        if !exists {
            return 0;
        }
        c.green.psql(&format!("SELECT count(*) FROM {state}.chunks WHERE done")).parse().unwrap()
    };
    let started = Instant::now();
    while done() < 3 {
        assert!(started.elapsed() < Duration::from_secs(60), "the copy did not start");
        assert!(leader.try_wait().unwrap().is_none(), "the copy ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    blue.stall_commits(true);
    let timing = || -> i64 {
        let q =
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep' AND query LIKE '%''commit latency''%'";
        blue.psql("postgres", q).parse().unwrap()
    };
    // A timing commit waits; the chunk under way ends, and no other starts.
    let stalled = Instant::now();
    let (mut most, mut held_at) = (0, done());
    let mut still = Instant::now();
    while still.elapsed() < Duration::from_secs(2) || most == 0 {
        assert!(stalled.elapsed() < Duration::from_secs(20), "the copy was not held: {held_at} chunks done");
        std::thread::sleep(Duration::from_millis(250));
        most = most.max(timing());
        let now = done();
        if now != held_at {
            (held_at, still) = (now, Instant::now());
        }
    }
    for _ in 0..8 {
        std::thread::sleep(Duration::from_secs(1));
        most = most.max(timing());
    }
    let after = done();
    blue.stall_commits(false);
    assert_eq!(most, 1, "timing commits piled up on blue");
    assert_eq!(after, held_at, "chunks were copied while blue's commits waited");

    c.wait_phase("following");
    // The copy done, its timing session is closed.
    let started = Instant::now();
    let asks =
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%''commit latency''%' AND pid <> pg_backend_pid()";
    while blue.psql("postgres", asks) != "0" {
        assert!(started.elapsed() < Duration::from_secs(20), "blue's commits are still timed after the copy");
        std::thread::sleep(Duration::from_millis(200));
    }
    writer.stop();
    c.assert_items_converge();
    let log = crate::capture::sigint_and_wait(&mut leader);
    assert!(
        log.contains(
            "copy waits: a commit on blue has not answered for longer than max_blue_commit_latency = 300.0 ms"
        ) && log.contains("a commit on blue has waited 3s ([copy] snapshot_max_age); cancelling it")
            && log.contains("copy goes on"),
        "{log}"
    );
}

/// A copy stopped (SIGINT) while its timing commit waits for blue's missing synchronous
/// standby leaves no session of ours waiting there: the commit is cancelled before the process
/// exits. Before, the session stayed until the standby was back, holding blue's horizon.
#[test]
fn a_copy_stopped_while_its_timing_commit_waits_leaves_nothing_waiting_on_blue() {
    let (blue, c, plan) = crate::support::Custom::items_on_own_blue(
        "blue-stall-exit",
        50_000,
        "workers = 1\nchunk_rows = 2000\nmax_rows_per_second = 2000\nmax_blue_commit_latency = \"300ms\"",
        "",
    );
    let mut copy = c.spawn(&["copy", plan.to_str().unwrap()], &[]);
    c.wait_phase("copying");
    blue.stall_commits(true);
    let timing = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%''commit latency''%' \
                  AND wait_event = 'SyncRep'";
    let started = Instant::now();
    while blue.psql("postgres", timing) == "0" {
        assert!(started.elapsed() < Duration::from_secs(20), "no timing commit waited");
        std::thread::sleep(Duration::from_millis(200));
    }
    crate::capture::sigint_and_wait(&mut copy);
    let left = blue.psql("postgres", timing);
    blue.stall_commits(false);
    assert_eq!(left, "0", "a timing commit still waited on blue after the copy exited");
}
