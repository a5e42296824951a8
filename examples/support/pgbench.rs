//! What the follow benchmarks share: their command-line flags and the plan over pgbench's tables.

/// The value after `--name` on the command line, or `default`.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned().unwrap_or_else(|| default.to_string())
}

/// An identity plan named `name` over `pgbench_accounts` (and, with `all`, the tellers and
/// branches), capture `method`, URLs from `BLUE_URL` and `GREEN_URL`.
pub fn plan(name: &str, method: &str, all: bool) -> String {
    let mut text = format!(
        "name = \"{name}\"\n[blue]\nurl = \"${{BLUE_URL}}\"\n[green]\nurl = \"${{GREEN_URL}}\"\n[capture]\nmethod = \"{method}\"\n\
         [[table]]\nsource = \"pgbench_accounts\"\nkey = [\"aid\"]\n[table.columns]\naid = \"aid\"\nbid = \"bid\"\n\
         abalance = \"abalance\"\nfiller = \"filler\"\n"
    );
    if all {
        text.push_str(
            "[[table]]\nsource = \"pgbench_tellers\"\nkey = [\"tid\"]\n[table.columns]\ntid = \"tid\"\nbid = \"bid\"\n\
             tbalance = \"tbalance\"\nfiller = \"filler\"\n\
             [[table]]\nsource = \"pgbench_branches\"\nkey = [\"bid\"]\n[table.columns]\nbid = \"bid\"\n\
             bbalance = \"bbalance\"\nfiller = \"filler\"\n",
        );
    }
    text
}

/// Runs pgbench against `db` on `c` with `args`; its output.
pub fn run(c: &super::cluster::Cluster, db: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(c.bindir.join("pgbench"))
        .args(["-h", "127.0.0.1", "-U", "postgres", "-p", &c.port.to_string()])
        .args(args)
        .arg(db)
        .output()
        .expect("run pgbench");
    assert!(out.status.success(), "pgbench failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}
