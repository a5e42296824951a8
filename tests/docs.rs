//! The commands README.md and docs/runbook.md give, run as written (in a shell, in the order the
//! documents give them) against the OAuth fixture: the plan file they name is this scenario's
//! plan with the `[cutover.pgbouncer]` section the runbook asks for, and the variables they
//! `export` point at the fixture. Catches a documented command that no longer works.

use std::{path::Path, process::Command, time::Duration};

use crate::{
    capture::{caught_up, wait_for},
    support::{root, Oauth},
};

/// The `migrate …` lines of the ```sh blocks of `doc`, comments removed, in order.
fn commands(doc: &str) -> Vec<String> {
    let text = std::fs::read_to_string(root().join(doc)).unwrap();
    let mut out = Vec::new();
    let mut in_sh = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            in_sh = t == "```sh";
            continue;
        }
        if in_sh && t.starts_with("migrate ") {
            let cmd = t.split(" #").next().unwrap_or(t).trim();
            out.push(cmd.to_string());
        }
    }
    assert!(!out.is_empty(), "{doc} gives no `migrate` command in a ```sh block");
    out
}

/// Runs `line` in a shell in `dir`, with `migrate` on the PATH and the scenario's variables.
fn shell(s: &Oauth, dir: &Path, line: &str) -> Command {
    let bin = assert_cmd::cargo::cargo_bin("migrate");
    let path = format!("{}:{}", bin.parent().unwrap().display(), std::env::var("PATH").unwrap_or_default());
    let mut c = Command::new("sh");
    c.args(["-c", line])
        .current_dir(dir)
        .env("PATH", path)
        .env("BLUE_URL", s.blue.url())
        .env("GREEN_URL", s.green.url())
        .env("MIGRATE_LOG", "warn");
    c
}

#[test]
fn readme_commands_run_as_written() {
    run_documented("README.md");
}

#[test]
fn runbook_commands_run_as_written() {
    run_documented("docs/runbook.md");
}

/// Runs every documented `migrate` command of `doc` against a fresh scenario.
fn run_documented(doc: &str) {
    let s = Oauth::new(5_000);
    let (bouncer, section) = s.bouncer();
    let plan = s.write_plan(&format!("{}\n{section}", Oauth::plan_text()));
    let dir = s.dir.path();
    // The documents name the repository's plan; here it is this scenario's.
    std::fs::create_dir_all(dir.join("plans")).unwrap();
    std::fs::copy(&plan, dir.join("plans/oauth-v1-to-v2.toml")).unwrap();
    let plan = dir.join("plans/oauth-v1-to-v2.toml");
    let mut follower: Option<std::process::Child> = None;
    let mut ran = Vec::new();
    for line in commands(doc) {
        if line.starts_with("migrate completions") || line.starts_with("migrate man") {
            // Not into the system's directories: the output is checked instead.
            let out = shell(&s, dir, line.split(" > ").next().unwrap_or(&line)).output().unwrap();
            assert!(out.status.success() && !out.stdout.is_empty(), "{doc}: `{line}`");
            ran.push(line);
            continue;
        }
        if line.contains("--watch") {
            // Runs until Ctrl-C: watched for a moment, then interrupted as a person would.
            let mut child =
                shell(&s, dir, &format!("exec {line}")).stdout(std::process::Stdio::piped()).spawn().unwrap();
            std::thread::sleep(Duration::from_millis(1500));
            let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
            assert!(child.wait().unwrap().success(), "{doc}: `{line}`");
            ran.push(line);
            continue;
        }
        let is_copy = line.starts_with("migrate copy") && !line.contains("--no-follow");
        if is_copy && follower.as_mut().is_some_and(|f| f.try_wait().unwrap().is_none()) {
            // Already following (the runbook restarts it after a crash): one at a time.
            continue;
        }
        if is_copy {
            let mut child = shell(&s, dir, &line).spawn().unwrap();
            if std::fs::read_to_string(&bouncer.databases_file).unwrap().contains(&s.green.name) {
                // After the switch: copy says so and exits.
                assert!(child.wait().unwrap().success(), "{doc}: `{line}` after the switch");
            } else {
                wait_for(&s, &plan, &mut child, Duration::from_secs(120), "the documented copy to follow", caught_up);
                follower = Some(child);
            }
            ran.push(line);
            continue;
        }
        let out = shell(&s, dir, &line).output().unwrap();
        assert!(
            out.status.success(),
            "{doc}: `{line}` exited {:?}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ran.push(line);
    }
    if let Some(mut f) = follower {
        // After the documented cutover the follower ends by itself.
        let st = f.wait().unwrap();
        assert!(st.success(), "{doc}: the follower ended with {st}");
    }
    assert!(ran.iter().any(|l| l.starts_with("migrate cutover") && !l.contains("--dry-run")), "{doc}: {ran:?}");
    assert!(std::fs::read_to_string(&bouncer.databases_file).unwrap().contains(&s.green.name), "{doc}: not switched");
    eprintln!("{doc}: ran {} documented commands: {ran:#?}", ran.len());
}
