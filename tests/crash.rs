//! Crash anywhere, lose nothing: `migrate copy` killed abruptly (as by SIGKILL, through the fault
//! points) in each phase under a concurrent writer, then rerun; blue and green restarted while
//! following. Each time green must converge to transform(blue), by the independent fingerprint.

use std::time::Duration;

use crate::{
    capture::{caught_up, status, wait_for},
    support::{replace_once, run, writer::Writer, Cluster, Oauth},
};

fn plan(s: &Oauth, method: &str) -> std::path::PathBuf {
    let text = replace_once(&Oauth::plan_text(), "workers = 2\nchunk_rows = 50000", "workers = 2\nchunk_rows = 2000");
    let text = replace_once(&text, "method = \"auto\"", &format!("method = \"{method}\""));
    s.write_plan(&text)
}

/// `status` is what the follower last reported, which may predate the last writes: the proof
/// is a `copy --no-follow`, which returns once green holds everything blue had committed.
fn converge_and_compare(s: &Oauth, plan: &std::path::Path) {
    let r = run(&mut s.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]));
    assert_eq!(r.code, 0, "{r:?}");
    s.assert_green_equals_blue();
}

fn killed_at(point: &str, method: &str) {
    let s = Oauth::new(20_000);
    let plan = plan(&s, method);
    let writer = Writer::start(s.blue.url(), Duration::from_millis(2));
    let p = plan.to_str().unwrap();
    let r = run(s.migrate(&["copy", p, "--no-follow"]).env("MIGRATE_FAULT", point));
    assert_eq!(r.code, 137, "{point}: the fault point was not reached\n{r:?}");
    // The rerun resumes (or redoes what it must) while the writer goes on.
    let r = run(&mut s.migrate(&["copy", p, "--no-follow"]));
    assert_eq!(r.code, 0, "{point}: rerun after the crash\n{r:?}");
    let ops = writer.stop();
    assert!(ops > 100, "writer made only {ops} writes");
    let r = run(&mut s.migrate(&["copy", p, "--no-follow"]));
    assert_eq!(r.code, 0, "{point}: final catch-up\n{r:?}");
    s.assert_green_equals_blue();
    let r = run(&mut s.migrate(&["verify", p]));
    assert_eq!(r.code, 0, "{point}: verify after the crash\n{r:?}");
}

#[test]
fn killed_after_a_chunk_commit() {
    killed_at("copy.chunk-done", "logical");
}

#[test]
fn killed_while_rebuilding_indexes() {
    killed_at("copy.rebuild", "logical");
}

#[test]
fn killed_between_storing_keys_and_advancing_the_slot() {
    killed_at("capture.stored", "logical");
}

#[test]
fn killed_after_an_apply_commit_with_trigger_capture() {
    killed_at("apply.committed", "trigger");
}

/// Blue, then green, restarted under a following `copy`: it reconnects with bounded backoff,
/// says so, and loses nothing.
#[test]
fn follower_survives_blue_and_green_restarts() {
    let blue: &'static Cluster = Cluster::own("rblue", &[]);
    let green: &'static Cluster = Cluster::own("rgreen", &[]);
    let s = Oauth::on(blue, green, 10_000);
    let plan = plan(&s, "logical");
    let mut copy = s.spawn(&["copy", plan.to_str().unwrap()]);
    let w = Writer::start(s.blue.url(), Duration::from_millis(2));
    std::thread::sleep(Duration::from_secs(2));
    w.stop();
    wait_for(&s, &plan, &mut copy, Duration::from_secs(60), "following", caught_up);

    for (side, cluster) in [("blue", blue), ("green", green)] {
        let w = Writer::start(s.blue.url(), Duration::from_millis(2));
        std::thread::sleep(Duration::from_millis(500));
        // The writer's own sessions would die with blue: it stops first. While green restarts it
        // goes on writing, and those changes must arrive once green is back.
        let w = if side == "blue" {
            w.stop();
            None
        } else {
            Some(w)
        };
        cluster.restart().unwrap_or_else(|e| panic!("restarting {side}: {e}"));
        std::thread::sleep(Duration::from_secs(2));
        if let Some(w) = w {
            w.stop();
        }
        let w = Writer::start(s.blue.url(), Duration::from_millis(2));
        std::thread::sleep(Duration::from_secs(1));
        w.stop();
        assert!(copy.try_wait().unwrap().is_none(), "copy exited after {side} restarted");
        wait_for(&s, &plan, &mut copy, Duration::from_secs(60), &format!("catch-up after {side} restart"), caught_up);
    }
    let st = status(&s, &plan);
    assert_eq!(st["phase"], "following");
    let log = crate::capture::sigint_and_wait(&mut copy);
    assert!(log.contains("reconnecting"), "no reconnect was logged:\n{log}");
    converge_and_compare(&s, &plan);
}

/// Sends `signal` to a cluster's postmaster and every backend it started.
fn signal_cluster(c: &Cluster, signal: &str) {
    let pid = std::fs::read_to_string(c.pidfile()).unwrap().lines().next().unwrap().trim().to_string();
    let children = std::process::Command::new("pgrep").args(["-P", &pid]).output().unwrap();
    let ok = std::process::Command::new("kill").arg(format!("-{signal}")).arg(&pid).status().unwrap().success();
    assert!(ok, "kill -{signal} {pid} (postmaster)");
    // A backend may have exited since it was listed: only the postmaster must take the signal.
    let children: Vec<String> =
        String::from_utf8_lossy(&children.stdout).split_whitespace().map(str::to_string).collect();
    let _ = std::process::Command::new("kill").arg(format!("-{signal}")).args(&children).status();
}

/// Green stops answering (SIGSTOP) while following: the stalled round is given up after
/// `stall_timeout`, reconnects are retried with backoff, and once green answers again nothing
/// is lost.
#[test]
fn a_stalled_green_is_detected_by_timeouts() {
    let blue = crate::support::blue_cluster();
    let green: &'static Cluster = Cluster::own("sgreen", &[]);
    let s = Oauth::on(blue, green, 5_000);
    let text = replace_once(&Oauth::plan_text(), "method = \"auto\"", "method = \"auto\"\nstall_timeout = \"2s\"");
    let plan = s.write_plan(&text);
    let mut copy = s.spawn(&["copy", plan.to_str().unwrap()]);
    wait_for(&s, &plan, &mut copy, Duration::from_secs(60), "following", caught_up);
    let w = Writer::start(s.blue.url(), Duration::from_millis(2));
    std::thread::sleep(Duration::from_millis(300));
    signal_cluster(green, "STOP");
    std::thread::sleep(Duration::from_secs(6));
    signal_cluster(green, "CONT");
    std::thread::sleep(Duration::from_secs(1));
    w.stop();
    assert!(copy.try_wait().unwrap().is_none(), "copy exited while green was stalled");
    wait_for(&s, &plan, &mut copy, Duration::from_secs(60), "catch-up after the stall", caught_up);
    let log = crate::capture::sigint_and_wait(&mut copy);
    assert!(log.contains("no answer within"), "the stall was not reported:\n{log}");
    converge_and_compare(&s, &plan);
}

/// Blue's commits wait for a synchronous standby that is gone (`synchronous_standby_names =
/// 'nobody'` for 20 s) while following with trigger capture (`stall_timeout = "2s"`; capture
/// paused by `migrate control` just before, so blue holds changes to remove): each capture
/// round stalls in its commit on blue and is given up, and the statement it left
/// waiting is cancelled, so blue holds at most a couple of our sessions waiting. Before, each
/// stall left one more waiting until the standby was back (PostgreSQL does not notice a client
/// gone while it waits for a standby): the first for the standby, the next ones for its row
/// locks. Once blue commits again, nothing is lost.
#[test]
fn a_blue_whose_commits_stall_is_not_left_our_waiting_sessions() {
    // (The OAuth writer's late transaction would hold blue's horizon through the stall, and
    // trigger capture reads only below it: no round would have anything to remove.)
    let (blue, c, plan) =
        crate::support::Custom::items_on_own_blue("sblue", 20_000, "workers = 1", "stall_timeout = \"2s\"\n");
    let mut copy = c.spawn(&["copy", plan.to_str().unwrap()], &[]);
    c.wait_phase("following");
    // Capture paused while the writer goes on: when the stall begins, blue holds committed
    // changes that capture has still to remove.
    let p = plan.to_str().unwrap();
    assert_eq!(run(&mut c.migrate(&["control", p, "pause"])).code, 0);
    let writer = crate::support::ItemsWriter::start(&c.blue, 20_000);
    std::thread::sleep(Duration::from_secs(3));
    blue.stall_commits(true);
    assert_eq!(run(&mut c.migrate(&["control", p, "resume"])).code, 0);
    // Ours, waiting: for the standby (IPC: SyncRep), or for the row locks of one that does.
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'migrate%' \
                   AND state = 'active' AND wait_event_type IN ('IPC', 'Lock')";
    let mut most = 0;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(500));
        most = most.max(blue.psql("postgres", waiting).parse::<i64>().unwrap());
    }
    blue.stall_commits(false);
    writer.stop();
    assert!(copy.try_wait().unwrap().is_none(), "copy exited while blue's commits stalled");
    assert!(most >= 1, "no commit of ours waited for the standby: the stall was not one");
    assert!(most <= 2, "{most} sessions of ours waited on blue at once");
    c.assert_items_converge();
    let log = crate::capture::sigint_and_wait(&mut copy);
    assert!(log.contains("no answer within"), "the stall was not reported:\n{log}");
}

/// A copy killed while rebuilding indexes left them (and the foreign keys) off green: `cleanup`
/// rebuilds them before it removes the state and says so, or, where the rows do not allow it
/// (a table not fully copied), refuses and lists each with the statement that restores it.
#[test]
fn cleanup_after_a_copy_killed_mid_rebuild_restores_green_or_refuses() {
    let s = Oauth::new(5_000);
    let plan = plan(&s, "logical");
    let r = run(s.migrate(&["copy", plan.to_str().unwrap(), "--no-follow"]).env("MIGRATE_FAULT", "copy.rebuild"));
    assert_eq!(r.code, 137, "the fault did not fire: {r:?}");
    let indexes =
        |s: &Oauth| s.green.psql("SELECT count(*) FROM pg_index WHERE indrelid = 'oauth2_access_tokens'::regclass");
    let foreign = |s: &Oauth| s.green.psql("SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND convalidated");
    assert!(indexes(&s) != "4" || foreign(&s) != "2", "nothing was left off green: the test proves nothing");
    let state = |s: &Oauth| s.green.psql("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'bluegreen%'");
    let r = run(&mut s.migrate(&["cleanup", plan.to_str().unwrap()]));
    match r.code {
        0 => {
            assert!(r.stdout.contains("restored on green: "), "{r:?}");
            assert_eq!(foreign(&s), "2", "validated foreign keys");
        }
        3 => {
            // Refused: what could not be restored is listed, and nothing was removed.
            assert!(r.stderr.contains("cleanup refused") && r.stderr.contains("VALIDATE CONSTRAINT"), "{r:?}");
            assert_eq!(state(&s), "1", "state removed although cleanup refused");
            let forced = run(&mut s.migrate(&["cleanup", plan.to_str().unwrap(), "--force"]));
            assert_eq!(forced.code, 0, "{forced:?}");
            assert!(forced.stderr.contains("not restored (--force)"), "{forced:?}");
        }
        _ => panic!("{r:?}"),
    }
    // Indexes and keys are back either way (only foreign keys need the rows).
    assert_eq!(indexes(&s), "4", "indexes of oauth2_access_tokens");
    assert_eq!(state(&s), "0");
}
