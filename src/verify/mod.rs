//! Stage 4: verify. Each table's rows are hashed inside both servers: blue hashes the resolved
//! transforming SELECT, green the mapped target columns, both as the row's text form in sessions
//! pinned to the same settings. Rows are bucketed by a hash of their key (no collation involved),
//! each bucket summarised as (count, sum of row hashes) in one scan per side; only buckets that
//! differ are drilled into, first as (key, hash) pairs, then as full rows for the differing keys,
//! diffed column by column. Buckets are recorded with the blue position they were verified at.
//! While a follower is running, a difference is rechecked after apply
//! has passed blue's position at the time of the check; only differences that persist count.

mod parts;
mod report;
pub mod round_trip;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use tokio_postgres::Client;
use tracing::info;

pub use parts::join;
pub use report::{render_json, render_text};

use crate::{
    error::{Error, Result},
    pg::{commit_point, ident, literal, Lsn, SidePool},
    plan::{Plan, ResolvedPlan, ResolvedTable},
    state::State,
};

/// Rows per bucket (about).
const BUCKET_ROWS: u64 = 50_000;

/// Differing buckets re-read row by row in one scan per side (with 50,000-row buckets, about a
/// million rows in memory per side).
const RE_READ_BUCKETS: usize = 20;
/// Differences shown per table.
const MAX_SHOWN: usize = 100;
/// Rechecks of a difference while a follower applies, and the wait for it each time.
const RECHECK_ROUNDS: u32 = 5;
const RECHECK_WAIT: Duration = Duration::from_secs(10);
/// Capture's position unchanged this long after a commit point, and no follower report for
/// [`FOLLOWER_SILENT`]: no follower is running (a running one may sit on one big transaction).
const CAPTURE_SILENT: Duration = Duration::from_secs(3);
/// See [`CAPTURE_SILENT`]; a busy follower reports every second.
const FOLLOWER_SILENT: Duration = Duration::from_secs(5);

/// Keys compared per query by `--changed`.
const CHANGED_KEYS: usize = 5_000;

/// Values longer than this are shortened in reports.
const SHOW_CHARS: usize = 60;

/// How one row differs.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// On blue (after transform and filter), not on green.
    MissingOnGreen,
    /// On green, not on blue.
    ExtraOnGreen,
    /// On both, with different values.
    Differs,
}

/// One differing row.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Difference {
    /// Key values (target key columns).
    pub key: Vec<String>,
    /// Classification.
    pub kind: Kind,
    /// For `differs`: (column, blue value, green value), values shortened.
    pub columns: Vec<(String, Option<String>, Option<String>)>,
}

/// One table's verdict.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableReport {
    /// Target table.
    pub table: String,
    /// Buckets compared.
    pub buckets: u64,
    /// Buckets whose summaries differed at first.
    pub buckets_differing: u64,
    /// Rows on blue (after transform and filter).
    pub rows_blue: i64,
    /// Rows on green.
    pub rows_green: i64,
    /// Differences that persisted (at most 100 shown; `differences_total` counts all).
    pub differences: Vec<Difference>,
    /// All persisting differences.
    pub differences_total: usize,
    /// Seconds spent on this table: its comparison, and its share of the time the summaries took
    /// (whole tables' parts are read together, shared by the time each table's parts took).
    pub seconds: f64,
    /// With `--changed`: the keys changed since the table's last clean verify, checked one by
    /// one instead of the whole table (`None`: the whole table was checked).
    pub changed_keys: Option<usize>,
}

/// The whole verify run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Plan name.
    pub plan: String,
    /// Per table.
    pub tables: Vec<TableReport>,
    /// No differences anywhere.
    pub equal: bool,
    /// Seconds taken.
    pub seconds: f64,
}

/// Runs verify over the plan's tables (or the one named by `only`, source or target name).
/// With `changed`, a table whose last verify was clean is checked only at the keys applied since
/// (a table never verified clean is checked whole).
pub async fn run(
    plan: &Plan,
    resolved: &ResolvedPlan,
    only: Option<&str>,
    changed: bool,
    shutdown: &crate::shutdown::Shutdown,
) -> Result<Report> {
    // Sessions for the comparison after the summaries (re-reads, rechecks, `--changed`); the
    // summaries' own sessions are the parts' lanes. Pooled: a session that broke is replaced.
    let (blue_pool, green_pool) = (SidePool::new(&plan.blue, 1)?, SidePool::new(&plan.green, 1)?);
    let sessions = tokio::try_join!(blue_pool.get(), green_pool.get())?;
    let (blue, green): (&Client, &Client) = (&sessions.0, &sessions.1);
    for (c, side) in [(blue, "blue"), (green, "green")] {
        session(c).await.map_err(Error::db(format!("{side}: verify session")))?;
    }
    let hashing = portable_hash(blue, green).await?;
    let state = State::new(&plan.name);
    let follower = if state.exists(green).await? { Some(state.clone()) } else { None };
    if let Some(state) = &follower {
        // One verify of a plan at a time (a run's parts are its own), taken before anything is
        // read so a verify that waited reads from where it starts.
        let mut said = Instant::now() - Duration::from_secs(30);
        while !state.try_begin_verify_run(green).await? {
            if shutdown.is_triggered() {
                return Err(Error::Interrupted { during: "while waiting for another verify of this plan".into() });
            }
            if said.elapsed() >= Duration::from_secs(30) {
                info!(plan = %plan.name, "another verify of this plan is running; waiting for it to end");
                said = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // Before any position is read: from here on, direct apply records what it applies.
        state.mark_verify_started(green).await?;
    }
    let report = run_locked(plan, resolved, only, changed, shutdown, (blue, green), follower.as_ref(), hashing).await;
    if let Some(state) = &follower {
        state.end_verify_run(green).await;
    }
    let report = report?;
    if let Some(state) = follower {
        let value = serde_json::json!({
            "equal": report.equal,
            "seconds": report.seconds,
            "tables": report.tables.iter().map(|t| serde_json::json!({"table": t.table, "differences": t.differences_total})).collect::<Vec<_>>(),
        });
        state.set_last_verify(green, &value).await?;
    }
    Ok(report)
}

/// [`run`] once it holds the plan's verify lock.
#[allow(clippy::too_many_arguments)]
async fn run_locked(
    plan: &Plan,
    resolved: &ResolvedPlan,
    only: Option<&str>,
    changed: bool,
    shutdown: &crate::shutdown::Shutdown,
    (blue, green): (&Client, &Client),
    follower: Option<&State>,
    hashing: Hashing,
) -> Result<Report> {
    let started = Instant::now();
    // Each selected table: checked whole, or (`--changed`, verified clean before) by its
    // changed keys.
    let mut selected = Vec::new();
    for t in &resolved.tables {
        if only.is_some_and(|o| !t.named_by_any(&[o.to_string()])) {
            continue;
        }
        let clean_before = match (follower, changed) {
            (Some(state), true) => state.verified_clean(green, &t.id).await?,
            _ => false,
        };
        selected.push((Queries::new(hashing, green, t).await, clean_before));
    }
    if only.is_some() && selected.is_empty() {
        return Err(Error::NoSuchTable { flag: "--table", name: only.unwrap_or_default().to_string() });
    }
    let whole: Vec<Queries> = selected.iter().filter(|(_, clean)| !clean).map(|(q, _)| q.clone()).collect();
    let mut summed = parts::Summed { sums: parts::Summaries::new(), seconds: HashMap::new() };
    let mut position = Lsn(0);
    let mut phase = 0.0;
    if !whole.is_empty() {
        position = commit_point(blue).await?;
        // Green first takes in what blue committed so far (bounded): buckets then differ only
        // by what green had not applied when the run's snapshots were taken, and a differing
        // bucket costs a re-read.
        if let Some(state) = follower {
            wait_applied(green, state, position).await?;
        }
        summed = parts::lead(plan, follower, (blue, green), &whole, shutdown).await?;
        phase = started.elapsed().as_secs_f64();
    }
    // The summaries' wall time, shared among the tables by the time their parts took.
    let total: f64 = summed.seconds.values().sum();
    let mut tables = Vec::new();
    for (q, clean_before) in selected {
        let span = tracing::info_span!("verify", table = %q.t.target);
        let (n, id) = (q.buckets(), q.t.id.as_str().to_string());
        let v = Verifier { blue, green, q, follower, source_keys: clean_before };
        let share = if total > 0.0 { phase * summed.seconds.get(&id).copied().unwrap_or(0.0) / total } else { 0.0 };
        let report = match (follower, clean_before) {
            // Touched keys are in blue's text, as capture recorded them.
            (Some(state), true) => tracing::Instrument::instrument(v.changed_only(state), span).await?,
            _ => {
                let empty = parts::PartSummary::new();
                let side = |s: &'static str| summed.sums.get(&(id.clone(), s)).unwrap_or(&empty);
                tracing::Instrument::instrument(v.compare(n, position, side("blue"), side("green"), share), span)
                    .await?
            }
        };
        tables.push(report);
    }
    let equal = tables.iter().all(|t| t.differences_total == 0);
    Ok(Report { plan: plan.name.clone(), tables, equal, seconds: started.elapsed().as_secs_f64() })
}

/// Verify's session settings. A session waits idle (in a transaction holding a part's claim
/// while blue reads it, or between the summaries and the comparison) for as long as the read
/// takes: server-wide idle timeouts must not end it. The summaries' `enable_sort = off` is set
/// in their own transactions only (see [`SUMMARY_SETTINGS`]).
async fn session(c: &impl tokio_postgres::GenericClient) -> std::result::Result<(), tokio_postgres::Error> {
    c.batch_execute("SET idle_in_transaction_session_timeout = 0; SET idle_session_timeout = 0").await
}

/// Settings of a part's summary transaction. The planner cannot know a bucket expression has
/// only `n` values; it expects a group per row and, at 100M rows, sorted the table to disk for
/// the GROUP BY (tens of GB of temporary files) where a hash of `n` entries fits in memory:
/// `enable_sort = off`. Only there: set for a whole session, every small query that sorts (a
/// claim's `ORDER BY … LIMIT 1`) carries the planner's disable cost, which is above every JIT
/// threshold, and was compiled with inlining and optimization (100 ms of CPU a claim, against
/// half a millisecond to run it; 15 % of a 10M-row verify's CPU here).
pub(super) const SUMMARY_SETTINGS: &str = "SET LOCAL enable_sort = off";

/// The row-hash function. `hash_record_extended` hashes each column with its type's own hash
/// (no text rendering: 1.5x faster here on jsonb-heavy rows), and equal values hash equal (jsonb
/// key order, numeric scale). Its result is only known to agree between servers of the same
/// version and architecture, so both are asked for a probe value; when they disagree, md5 of the
/// row's text (portable by definition) is used instead. When the two databases store text in
/// different encodings (a LATIN1 blue), the same text has other bytes on each side: every hash
/// is then taken over the text converted to UTF8.
async fn portable_hash(blue: &Client, green: &Client) -> Result<Hashing> {
    const ENCODING: &str = "SELECT current_setting('server_encoding')";
    let encodings = tokio::try_join!(blue.query_one(ENCODING, &[]), green.query_one(ENCODING, &[]))
        .map_err(Error::db("reading server encodings"))?;
    if encodings.0.get::<_, String>(0) != encodings.1.get::<_, String>(0) {
        return Ok(Hashing { typed: false, text: "('x' || left(md5(convert_to({}, 'UTF8')), 16))::bit(64)::bigint" });
    }
    // The record hash and, for the per-column typed hashes (`column_hash`), their combination
    // over values of each kind.
    const PROBE: &str = "SELECT hash_record_extended(r, 0), hashtextextended(r::text, 0), \
            hashtextextended(r.a, 1) # jsonb_hash_extended(r.b, 2) # hash_array_extended(r.c, 3) \
            # timestamp_hash_extended(r.d AT TIME ZONE 'UTC', 4) # hashint8extended(r.e::int8, 5) \
            # uuid_hash_extended(r.f, 6) # hash_numeric_extended(r.g, 7) # hashfloat8extended(r.h, 8) \
            # hashint4extended(r.i::int, 9) # timestamp_hash_extended(r.j, 10) FROM \
        (SELECT 'bluegreen ✓'::text a, '{\"b\": [1, 2.50]}'::jsonb b, ARRAY[1.5::numeric, NULL] c, \
                '2001-02-03 04:05:06+07'::timestamptz d, 'x'::bytea, -7::int4 e, \
                'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid f, 12.50::numeric g, 0.1::float8 h, true i, \
                '2001-02-03 04:05:06'::timestamp j) r";
    let b = blue.query_one(PROBE, &[]).await.map_err(Error::db("blue: hash probe"))?;
    let g = green.query_one(PROBE, &[]).await.map_err(Error::db("green: hash probe"))?;
    Ok(Hashing {
        typed: b.get::<_, i64>(0) == g.get::<_, i64>(0) && b.get::<_, i64>(2) == g.get::<_, i64>(2),
        text: if b.get::<_, i64>(1) == g.get::<_, i64>(1) {
            "hashtextextended({}, 0)"
        } else {
            "('x' || left(md5({}), 16))::bit(64)::bigint"
        },
    })
}

/// Row-by-row comparison of chosen keys on both sides, for cutover's final check of the keys
/// changed since the last verify.
pub struct KeyCheck {
    hashing: Hashing,
}

impl KeyCheck {
    /// Probes which hash functions agree between the two servers.
    pub async fn new(blue: &Client, green: &Client) -> Result<Self> {
        Ok(Self { hashing: portable_hash(blue, green).await? })
    }

    /// The keys (text values) whose rows differ between transform(blue) and green, or exist on
    /// one side only.
    pub async fn differing(
        &self,
        blue: &Client,
        green: &Client,
        t: &ResolvedTable,
        keys: &[Vec<String>],
    ) -> Result<Vec<Vec<String>>> {
        // The row hash verify uses: column by column where typed.
        let typed = self.hashing.typed && typed_hash_works(green, t).await;
        let v = Verifier::for_captured_keys(blue, green, t, (typed, self.hashing.text.replace("{}", "({})::text")));
        let hashes = v.hashes(keys).await?;
        Ok(keys.iter().filter(|k| hashes.get(*k).is_some_and(|(b, g)| b != g)).cloned().collect())
    }

    /// How the rows of `keys` differ, column by column, as `verify` reports it.
    pub async fn describe(
        &self,
        blue: &Client,
        green: &Client,
        t: &ResolvedTable,
        keys: &[Vec<String>],
    ) -> Result<Vec<Difference>> {
        Verifier::for_captured_keys(blue, green, t, (false, String::new())).describe(keys).await
    }
}

/// Which hash functions agree between the two servers.
#[derive(Clone, Copy)]
struct Hashing {
    /// `hash_record_extended` agrees.
    typed: bool,
    /// Text hash expression (with `{}` for the text).
    text: &'static str,
}

/// Whether every column hashed by its type has an extended hash function (json, xml, point do
/// not).
async fn typed_hash_works(green: &Client, t: &ResolvedTable) -> bool {
    let nulls: Vec<String> = t
        .mapped()
        .map(|c| if hashed_as_text(t, c) { "NULL::text".to_string() } else { format!("NULL::{}", c.target_type) })
        .collect();
    green.query_one(&format!("SELECT hash_record_extended(ROW({}), 0)", nulls.join(", ")), &[]).await.is_ok()
}

/// The alias of a row inside verify's queries. Whole rows are never referenced by it (a column of
/// that name would shadow it): rows are rebuilt column by column with [`row_of`].
const ROW: &str = "bg_row";

/// Key columns and columns whose type compares loosely or hashes server-specifically are
/// compared by their exact text: `1.0` and `1.00`, `alice` and `ALICE` (citext) differ. A key
/// of a type whose equality is its text's (integers, uuid) keeps its typed hash (cheaper).
fn hashed_as_text(t: &ResolvedTable, c: &crate::plan::ResolvedColumn) -> bool {
    c.hash_by_text || (t.key.iter().any(|k| k.target == c.name) && !EXACT.contains(&c.target_type.as_str()))
}

/// Key types whose equality is their text's.
const EXACT: &[&str] = &["smallint", "integer", "bigint", "uuid"];

/// The typed hash of column `col` of type `ty` (as `format_type` writes it) with `seed`: by
/// the function its type's hash operator class uses, as `hash_record_extended` would, where
/// that tells every two different values apart; `None` for a type without one here (the
/// record hash of the rest takes it).
///
/// Where the type's own hash does not, this adds what it leaves out, or hashes the exact text:
/// - numeric hashes its digits XOR its weight, without the sign, and every NaN or infinity to
///   the seed: the sign and the special value are XORed in, and the result hashed again with
///   the seed, so that a change of weight (a value scaled by 10,000) changes a row's hash
///   differently in each column and two such changes cannot cancel out;
/// - arrays hash an empty array to 1 and NULL elements to constants, whatever the seed: hashed
///   again with the seed; arrays of numeric, jsonb or floats hash their text;
/// - jsonb hashes numbers without their sign and `{}` as `[]`: its text (canonical: key order
///   and white space do not count, a number's written scale does);
/// - text compares under the C collation, so a nondeterministic collation's equal strings
///   (`Alice`, `alice`) still differ.
fn column_hash(col: &str, ty: &str, seed: i64) -> Option<String> {
    // Type modifiers do not change the hash: `numeric(10,2)`, `character varying(20)`.
    let mut base = String::new();
    let mut depth = 0;
    for ch in ty.chars() {
        match ch {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ if depth == 0 => base.push(ch),
            _ => {}
        }
    }
    let base = base.split_whitespace().collect::<Vec<_>>().join(" ");
    let scalar = |b: &str| -> Option<&'static str> {
        Some(match b {
            // The same hash as `bigint`'s for the same value (PostgreSQL's integer hashes agree
            // across widths), without a cast per row.
            "smallint" => "hashint2extended({}, {s})",
            "integer" => "hashint4extended({}, {s})",
            "bigint" => "hashint8extended({}, {s})",
            "text" | "character varying" => "hashtextextended(({})::text COLLATE \"C\", {s})",
            "uuid" => "uuid_hash_extended({}, {s})",
            "jsonb" => "hashtextextended(({})::text, {s})",
            "numeric" => {
                "hashint8extended(hash_numeric_extended({}, {s}) # CASE WHEN {} < 0 THEN {neg} \
                 WHEN {} = 'NaN' THEN {nan} WHEN {} = 'Infinity' THEN {inf} ELSE 0 END, {s})"
            }
            "double precision" => "hashfloat8extended({}, {s})",
            "real" => "hashfloat4extended({}, {s})",
            "boolean" => "hashint4extended(({})::int, {s})",
            "timestamp without time zone" => "timestamp_hash_extended({}, {s})",
            // The same instant whatever the session's time zone, as the type's own hash.
            "timestamp with time zone" => "timestamp_hash_extended({} AT TIME ZONE 'UTC', {s})",
            _ => return None,
        })
    };
    let template = match base.strip_suffix("[]") {
        Some("text" | "character varying") => "hashint8extended(hash_array_extended(({}) COLLATE \"C\", {s}), {s})",
        Some("numeric" | "jsonb" | "double precision" | "real") => "hashtextextended(({})::text, {s})",
        Some(element) if scalar(element).is_some() => "hashint8extended(hash_array_extended({}, {s}), {s})",
        Some(_) => return None,
        None => scalar(&base)?,
    };
    let constant = |n: i64| format!("({})::int8", position_constant(n as u64));
    Some(
        template
            .replace("{s}", &format!("({seed})::int8"))
            .replace("{neg}", &constant(1 << 20))
            .replace("{nan}", &constant((1 << 20) + 1))
            .replace("{inf}", &constant((1 << 20) + 2))
            .replace("{}", col),
    )
}

/// A random-looking 64-bit constant for `n` (splitmix64), the same in every build.
fn position_constant(n: u64) -> i64 {
    let mut z = n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as i64
}

/// A row's hash by its columns' typed hashes, combined by XOR; columns hashed as text hash
/// their text, and the columns of other types one `hash_record_extended` of a row of them. It
/// skips building a record per row: 17 % less time a part on blue and 26 % on green here than
/// `hash_record_extended` of the whole row.
///
/// Some values hash to a small constant whatever the seed (an empty array to 1, numeric zero
/// to the seed minus one, an empty jsonb and float zero to the seed): XORed as they are, two
/// such values in two columns cancel, and one looks like a NULL (0). So each column's hash is
/// XORed with a random-looking constant of its position before it counts, and a NULL adds 0:
/// a value and a NULL, or a value moved to another column, then differ. Written as
/// `coalesce(hash, mask)` per column and every mask XORed once at the end, which is the same
/// value (`coalesce(h # m, 0) = coalesce(h, m) # m`) for one XOR a row instead of one a column.
fn typed_row_hash(t: &ResolvedTable) -> String {
    let mut parts = Vec::new();
    let mut others = Vec::new();
    let mut masks = 0i64;
    for (i, c) in t.mapped().enumerate() {
        let col = format!("{ROW}.{}", ident(&c.name));
        let (seed, mask) = (position_constant(2 * i as u64), position_constant(2 * i as u64 + 1));
        let ty = if hashed_as_text(t, c) { "text" } else { c.target_type.as_str() };
        let hash = column_hash(&col, ty, seed);
        match hash {
            Some(h) => {
                parts.push(format!("coalesce({h}, ({mask})::int8)"));
                masks ^= mask;
            }
            None => others.push(col),
        }
    }
    if !parts.is_empty() {
        parts.push(format!("({masks})::int8"));
    }
    if !others.is_empty() {
        parts.push(format!("hash_record_extended(ROW({}), 0)", others.join(", ")));
    }
    format!("({})", parts.join(" # "))
}

/// `ROW(bg_row."a", bg_row."b"::text, …)`: the row to hash, each column typed or as text.
fn row_of(t: &ResolvedTable) -> String {
    let cols: Vec<String> = t
        .mapped()
        .map(|c| {
            let col = format!("{ROW}.{}", ident(&c.name));
            if hashed_as_text(t, c) {
                format!("{col}::text")
            } else {
                col
            }
        })
        .collect();
    format!("ROW({})", cols.join(", "))
}

/// One table's verify queries, with the hash expressions both servers agree on.
#[derive(Clone)]
pub(crate) struct Queries<'a> {
    t: &'a ResolvedTable,
    /// Row hash expression with `{}` for the row (see [`row_of`]); empty when `typed`.
    row_hash: String,
    /// Rows and integer or uuid keys hashed by their types' own hashes, column by column (see
    /// [`typed_row_hash`]).
    typed: bool,
    /// Hash expression with `{}` for a row of key columns.
    key_hash: String,
    /// Hash expression with `{}` for one key column's text.
    key_text_hash: String,
}

impl<'a> Queries<'a> {
    /// The queries of `t` under `hashing` (typed row hashes where every column has one).
    async fn new(hashing: Hashing, green: &Client, t: &'a ResolvedTable) -> Queries<'a> {
        let text = |e: &str| hashing.text.replace("{}", e);
        let typed = hashing.typed && typed_hash_works(green, t).await;
        let (row_hash, key_hash) = if typed {
            (String::new(), "hash_record_extended({}, 0)".to_string())
        } else {
            (text("({})::text"), text("({})::text"))
        };
        Queries { t, row_hash, typed, key_hash, key_text_hash: hashing.text.to_string() }
    }

    /// Buckets of a whole-table check.
    fn buckets(&self) -> i64 {
        (self.t.estimate.rows / BUCKET_ROWS).max(1) as i64
    }

    /// `(bucket, rows, sum of row hashes)` of the rows of `src` (the rows as [`ROW`]).
    fn summary(&self, src: &str, n: i64) -> String {
        format!(
            "SELECT abs({kh} % {n}) AS b, count(*), coalesce(sum({rh}), 0)::text FROM ({src}) {ROW} GROUP BY 1",
            kh = self.kh(),
            rh = self.rh(),
        )
    }

    /// The row hash.
    fn rh(&self) -> String {
        if self.typed {
            return typed_row_hash(self.t);
        }
        self.row_hash.replace("{}", &row_of(self.t))
    }

    /// The bucket hash of the row's key (by its text, so equal-comparing keys of different text
    /// land where their text says).
    fn kh(&self) -> String {
        let key = &self.t.key;
        match self.key_texts().as_slice() {
            // An integer or uuid key compares as its text does: its typed hash is cheaper than its
            // text's (5-9 % of a part here).
            [_] if self.typed && EXACT.contains(&key[0].target_type.as_str()) => {
                // Bucketing needs no mask: a key's hash is never compared with a NULL's or
                // another column's.
                let col = format!("{ROW}.{}", ident(&key[0].target));
                format!("coalesce({}, 0)", column_hash(&col, &key[0].target_type, 0).unwrap_or_default())
            }
            // One key column: its text hashed as text (a row of it costs a record per row); a
            // NULL key (green's, under a nullable unique index) goes to bucket 0.
            [one] => format!("coalesce({}, 0)", self.key_text_hash.replace("{}", one)),
            keys => self.key_hash.replace("{}", &format!("ROW({})", keys.join(", "))),
        }
    }

    /// The key columns' text.
    fn key_texts(&self) -> Vec<String> {
        self.t.key.iter().map(|k| format!("{ROW}.{}::text", ident(&k.target))).collect()
    }

    /// The rows as `r` on each side: blue's transforming SELECT, green's mapped columns.
    fn sources(&self) -> (String, String) {
        let blue = self.t.source_select(None);
        let green = format!("SELECT {} FROM {}", self.t.target_column_list(), self.t.target.quoted());
        (blue, green)
    }
}

struct Verifier<'a> {
    blue: &'a Client,
    green: &'a Client,
    q: Queries<'a>,
    follower: Option<&'a State>,
    /// Keys are given in blue's text (captured keys), not as the transformed rows show them.
    source_keys: bool,
}

impl<'a> Verifier<'a> {
    /// A verifier of single keys given in blue's text (cutover's re-checks): no buckets, no
    /// follower to wait for.
    fn for_captured_keys(
        blue: &'a Client,
        green: &'a Client,
        t: &'a ResolvedTable,
        (typed, row_hash): (bool, String),
    ) -> Self {
        let q = Queries { t, row_hash, typed, key_hash: String::new(), key_text_hash: String::new() };
        Verifier { blue, green, q, follower: None, source_keys: true }
    }
}

impl Verifier<'_> {
    /// Compares a whole table from its summaries (`bm` blue's, `gm` green's, summed over every
    /// part), taken at or after `position`: differing buckets are re-read row by row.
    async fn compare(
        &self,
        n: i64,
        position: Lsn,
        bm: &parts::PartSummary,
        gm: &parts::PartSummary,
        summaries: f64,
    ) -> Result<TableReport> {
        let started = Instant::now();
        let rows_blue = bm.values().map(|v| v.0).sum();
        let rows_green = gm.values().map(|v| v.0).sum();
        let mut differing: Vec<i64> = (0..n).filter(|i| bm.get(i) != gm.get(i)).collect();
        differing.sort();
        let buckets_differing = differing.len() as u64;
        let mut keys = Vec::new();
        let mut bucket_of = HashMap::new();
        // Rows with a NULL key part (green's, under a nullable unique index): no blue row can
        // equal them, and no key text names them.
        let mut null_keys = Vec::new();
        // Batches of buckets: one scan per side each, and at most about a million rows held.
        for batch in differing.chunks(RE_READ_BUCKETS) {
            let (found, nulls) = self.differing_keys(batch, n).await?;
            for (k, bucket) in found {
                bucket_of.insert(k.clone(), bucket);
                keys.push(k);
            }
            null_keys.extend(nulls);
        }
        let keys = self.recheck(keys).await?;
        let mut bad: std::collections::HashSet<i64> = keys.iter().filter_map(|k| bucket_of.get(k).copied()).collect();
        bad.extend(null_keys.iter().map(|(_, bucket, _)| *bucket));
        self.record(n, position, &bad).await?;
        let total = keys.len() + null_keys.len();
        let mut differences: Vec<Difference> = null_keys
            .iter()
            .take(MAX_SHOWN)
            .map(|(key, _, on_green)| Difference {
                key: key.iter().map(|k| k.clone().unwrap_or_else(|| "NULL".into())).collect(),
                kind: if *on_green { Kind::ExtraOnGreen } else { Kind::MissingOnGreen },
                columns: Vec::new(),
            })
            .collect();
        let room = MAX_SHOWN.saturating_sub(differences.len()).min(keys.len());
        differences.extend(self.describe(&keys[..room]).await?);
        let seconds = summaries + started.elapsed().as_secs_f64();
        info!(table = %self.q.t.target, buckets = n, buckets_differing, differences = total, seconds, "verified");
        Ok(TableReport {
            table: self.q.t.target.to_string(),
            buckets: n as u64,
            buckets_differing,
            rows_blue,
            rows_green,
            differences,
            differences_total: total,
            seconds,
            changed_keys: None,
        })
    }

    /// `--changed`: the table verified clean before; only the keys applied since are compared
    /// (row by row, on both sides), and those found equal up to this check's position are
    /// forgotten, as a clean full verify forgets them. Differences are rechecked once apply has
    /// passed blue's position, as the full check's are.
    async fn changed_only(&self, state: &State) -> Result<TableReport> {
        let started = Instant::now();
        let position = commit_point(self.blue).await?;
        // Everything captured up to the position applied before anything is read: then a key
        // recorded at or below it holds its final write for this check (trigger capture records
        // a write's position, not its commit's), and only keys written after it stay touched.
        for _ in 0..RECHECK_ROUNDS {
            match wait_applied(self.green, state, position).await? {
                Applied::Yes | Applied::Stuck => break,
                Applied::NotYet => {}
            }
        }
        state.compact_all_touched(self.green).await?;
        let keys = state.touched_keys(self.green, &self.q.t.id).await?;
        let mut differing = Vec::new();
        let mut equal = Vec::new();
        for batch in keys.chunks(CHANGED_KEYS) {
            let hashes = self.hashes(batch).await?;
            for k in batch {
                match hashes.get(k) {
                    Some((b, g)) if b != g => differing.push(k.clone()),
                    _ => equal.push(k.clone()),
                }
            }
        }
        let differing = self.recheck(differing).await?;
        for batch in equal.chunks(CHANGED_KEYS) {
            state.forget_touched_through(self.green, &self.q.t.id, batch, position).await?;
        }
        let total = differing.len();
        let differences = self.describe(&differing[..total.min(MAX_SHOWN)]).await?;
        let seconds = started.elapsed().as_secs_f64();
        info!(table = %self.q.t.target, changed = keys.len(), differences = total, seconds, "changed keys verified");
        Ok(TableReport {
            table: self.q.t.target.to_string(),
            buckets: 0,
            buckets_differing: 0,
            rows_blue: -1,
            rows_green: -1,
            differences,
            differences_total: total,
            seconds,
            changed_keys: Some(keys.len()),
        })
    }

    /// Records which buckets verified clean at which blue position, so a later check (cutover)
    /// needs to look again only at what changed since.
    async fn record(&self, n: i64, position: Lsn, bad: &std::collections::HashSet<i64>) -> Result<()> {
        let Some(state) = self.follower else { return Ok(()) };
        let ok: Vec<bool> = (0..n).map(|b| !bad.contains(&b)).collect();
        state.record_verified(self.green, &self.q.t.id, position, &ok).await
    }

    /// (key values, (bucket, row hash)) of every row in `buckets`, on one side: one scan for
    /// all of them. Rows with a NULL key part come apart, with their bucket.
    async fn bucket_rows(
        &self,
        client: &Client,
        src: &str,
        buckets: &[i64],
        n: i64,
    ) -> Result<(HashMap<Vec<String>, (i64, i64)>, Vec<(Vec<Option<String>>, i64)>)> {
        let sql = format!(
            "SELECT ARRAY[{keys}], b, h FROM (SELECT {keys_inner}, abs({kh} % {n}) AS b, {rh} AS h FROM ({src}) {ROW}) x \
             WHERE b = ANY($1)",
            keys = (0..self.q.t.key.len()).map(|i| format!("x.bg_k{i}")).collect::<Vec<_>>().join(", "),
            keys_inner =
                self.q.key_texts().iter().enumerate().map(|(i, k)| format!("{k} AS bg_k{i}")).collect::<Vec<_>>().join(", "),
            kh = self.q.kh(),
            rh = self.q.rh(),
        );
        let rows =
            client.query(&sql, &[&buckets]).await.map_err(Error::db(format!("reading rows of {}", self.q.t.target)))?;
        let (mut keyed, mut nulls) = (HashMap::new(), Vec::new());
        for r in &rows {
            let key: Vec<Option<String>> = r.get(0);
            match key.iter().cloned().collect::<Option<Vec<String>>>() {
                Some(k) => {
                    keyed.insert(k, (r.get(1), r.get(2)));
                }
                None => nulls.push((key, r.get(1))),
            }
        }
        Ok((keyed, nulls))
    }

    /// The keys (with their bucket) whose rows differ in the differing `buckets`, or exist on
    /// one side only: one scan per side however many buckets differ. Also the rows with a NULL
    /// key part (key, bucket, on green).
    #[allow(clippy::type_complexity)]
    async fn differing_keys(
        &self,
        buckets: &[i64],
        n: i64,
    ) -> Result<(Vec<(Vec<String>, i64)>, Vec<(Vec<Option<String>>, i64, bool)>)> {
        if buckets.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let (bs, gs) = self.q.sources();
        let (b, g) =
            tokio::join!(self.bucket_rows(self.blue, &bs, buckets, n), self.bucket_rows(self.green, &gs, buckets, n));
        let ((b, b_nulls), (g, g_nulls)) = (b?, g?);
        let mut keys: Vec<(Vec<String>, i64)> =
            b.iter().filter(|(k, h)| g.get(*k) != Some(h)).map(|(k, (bucket, _))| (k.clone(), *bucket)).collect();
        keys.extend(g.iter().filter(|(k, _)| !b.contains_key(*k)).map(|(k, (bucket, _))| (k.clone(), *bucket)));
        let nulls = b_nulls
            .into_iter()
            .map(|(k, bucket)| (k, bucket, false))
            .chain(g_nulls.into_iter().map(|(k, bucket)| (k, bucket, true)))
            .collect();
        Ok((keys, nulls))
    }

    /// Row hashes of the given keys on one side (absent keys are missing from the map).
    async fn side_hashes(&self, blue: bool, keys: &[Vec<String>]) -> Result<HashMap<Vec<String>, i64>> {
        Ok(self.by_key(blue, keys, &self.q.rh()).await?.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Row hashes of the given keys on both sides: (blue, green), `None` where absent.
    async fn hashes(&self, keys: &[Vec<String>]) -> Result<HashMap<Vec<String>, (Option<i64>, Option<i64>)>> {
        let (blue, green) = (self.side_hashes(true, keys).await?, self.side_hashes(false, keys).await?);
        Ok(keys.iter().map(|k| (k.clone(), (blue.get(k).copied(), green.get(k).copied()))).collect())
    }

    /// `SELECT key values, <what> FROM rows WHERE key IN keys` on one side.
    async fn by_key(&self, blue: bool, keys: &[Vec<String>], what: &str) -> Result<Vec<tokio_postgres::Row>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let (bs, gs) = self.q.sources();
        let src = if blue { bs } else { gs };
        // Rows are found by joining the given key texts, and named by them: a key given in
        // blue's text (a captured key) finds its row as apply wrote it, through blue's type.
        let mut on = Vec::new();
        let mut arrays = Vec::new();
        let mut names = Vec::new();
        for (i, k) in self.q.t.key.iter().enumerate() {
            let vals: Vec<String> =
                keys.iter().map(|key| literal(key.get(i).map(String::as_str).unwrap_or(""))).collect();
            arrays.push(format!("ARRAY[{}]::text[]", vals.join(", ")));
            names.push(format!("k{i}"));
            let through = if self.source_keys && k.via_source_type {
                format!("::{}::{}", k.source_type, k.target_type)
            } else {
                format!("::{}", k.target_type)
            };
            on.push(format!("{ROW}.{} = bg_key.k{i}{through}", ident(&k.target)));
        }
        let sql = format!(
            "SELECT ARRAY[{}], {what} FROM ({src}) {ROW} JOIN unnest({}) AS bg_key({}) ON {}",
            names.iter().map(|n| format!("bg_key.{n}")).collect::<Vec<_>>().join(", "),
            arrays.join(", "),
            names.join(", "),
            on.join(" AND ")
        );
        let client = if blue { self.blue } else { self.green };
        match client.query(&sql, &[]).await {
            // A key blue's encoding cannot hold (it came from green) is on no row of blue:
            // look the keys up one by one and leave those out.
            Err(e) if keys.len() > 1 && e.code().is_some_and(|c| c.code() == "22P05") => {
                let mut rows = Vec::new();
                for k in keys {
                    rows.extend(Box::pin(self.by_key(blue, std::slice::from_ref(k), what)).await?);
                }
                Ok(rows)
            }
            Err(e) if e.code().is_some_and(|c| c.code() == "22P05") => Ok(Vec::new()),
            r => r.map_err(Error::db(format!(
                "{}: reading rows of {} by key",
                if blue { "blue" } else { "green" },
                self.q.t.target
            ))),
        }
    }

    /// While a follower runs, differences may be changes not applied yet: read blue, wait until
    /// apply has passed blue's position after that read (decided from positions stored on
    /// green, not from how recently the follower reported), read green, then blue again. A key
    /// whose green row equals either blue read is in step: green holds what blue held at a
    /// moment after everything up to that position was applied. Keeps only what differs from
    /// both, round after round. (Comparing green with a blue read taken after the wait, alone,
    /// reported a key blue writes more often than apply's lag as a difference in every round.)
    async fn recheck(&self, mut keys: Vec<Vec<String>>) -> Result<Vec<Vec<String>>> {
        let Some(state) = self.follower else { return Ok(keys) };
        for _ in 0..RECHECK_ROUNDS {
            if keys.is_empty() {
                break;
            }
            let before = self.side_hashes(true, &keys).await?;
            let lsn = commit_point(self.blue).await?;
            let applied = wait_applied(self.green, state, lsn).await?;
            tracing::debug!(table = %self.q.t.target, keys = keys.len(), ?applied, "recheck");
            match applied {
                Applied::Yes => {
                    let green = self.side_hashes(false, &keys).await?;
                    let after = self.side_hashes(true, &keys).await?;
                    keys.retain(|k| {
                        let g = green.get(k);
                        g != before.get(k) && g != after.get(k)
                    });
                }
                Applied::NotYet => {}
                // Nobody captures or applies: what differs now is what green has.
                Applied::Stuck => break,
            }
        }
        Ok(keys)
    }

    /// Full rows for the keys on both sides, diffed column by column.
    async fn describe(&self, keys: &[Vec<String>]) -> Result<Vec<Difference>> {
        let cols: Vec<String> = self.q.t.mapped().map(|c| c.name.clone()).collect();
        let arr = format!(
            "ARRAY[{}]",
            cols.iter().map(|c| format!("{ROW}.{}::text", ident(c))).collect::<Vec<_>>().join(", ")
        );
        let fetch = |rows: Vec<tokio_postgres::Row>| -> HashMap<Vec<String>, Vec<Option<String>>> {
            rows.iter().map(|r| (r.get(0), r.get(1))).collect()
        };
        let b = fetch(self.by_key(true, keys, &arr).await?);
        let g = fetch(self.by_key(false, keys, &arr).await?);
        let mut out = Vec::new();
        for k in keys {
            let d = match (b.get(k), g.get(k)) {
                (Some(_), None) => Difference { key: k.clone(), kind: Kind::MissingOnGreen, columns: Vec::new() },
                (None, Some(_)) => Difference { key: k.clone(), kind: Kind::ExtraOnGreen, columns: Vec::new() },
                (Some(bv), Some(gv)) => Difference {
                    key: k.clone(),
                    kind: Kind::Differs,
                    columns: cols
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| bv.get(*i) != gv.get(*i))
                        .map(|(i, c)| {
                            (c.clone(), shorten(bv.get(i).cloned().flatten()), shorten(gv.get(i).cloned().flatten()))
                        })
                        .collect(),
                },
                (None, None) => continue,
            };
            out.push(d);
        }
        Ok(out)
    }
}

fn shorten(v: Option<String>) -> Option<String> {
    v.map(|s| if s.chars().count() > SHOW_CHARS { s.chars().take(SHOW_CHARS).collect::<String>() + "…" } else { s })
}

/// How a wait for apply to pass a position ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Applied {
    /// Everything captured up to the position is applied.
    Yes,
    /// Not yet, but capture moved during the wait: a follower is at work.
    NotYet,
    /// Capture's position did not move for a while: no follower is running.
    Stuck,
}

/// Waits (bounded) until capture has passed `lsn` and no key captured before it is pending.
/// A running capture records a new position every round once blue's WAL moved (and the commit
/// point just moved it): a position that stays put for [`CAPTURE_SILENT`] means nobody captures.
async fn wait_applied(green: &Client, state: &State, lsn: Lsn) -> Result<Applied> {
    let started = Instant::now();
    let mut position = state.capture_position(green).await?;
    let mut moved = Instant::now();
    while started.elapsed() < RECHECK_WAIT {
        if state.applied_through(green, lsn).await? {
            return Ok(Applied::Yes);
        }
        let now = state.capture_position(green).await?;
        if now != position {
            (position, moved) = (now, Instant::now());
        } else if moved.elapsed() > CAPTURE_SILENT && !state.follower_seen_within(green, FOLLOWER_SILENT).await? {
            return Ok(Applied::Stuck);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(Applied::NotYet)
}

#[cfg(test)]
mod tests {
    use super::column_hash;

    #[test]
    fn column_hashes_follow_the_type_without_its_modifiers() {
        let h = |ty: &str| column_hash("c", ty, -3);
        assert_eq!(h("integer").as_deref(), Some("hashint4extended(c, (-3)::int8)"));
        assert_eq!(h("bigint").as_deref(), Some("hashint8extended(c, (-3)::int8)"));
        assert!(h("numeric(10,2)")
            .is_some_and(|n| n.starts_with("hashint8extended(hash_numeric_extended(c, (-3)::int8) # CASE WHEN c < 0")));
        assert_eq!(
            h("character varying(20)[]").as_deref(),
            Some("hashint8extended(hash_array_extended((c) COLLATE \"C\", (-3)::int8), (-3)::int8)")
        );
        assert_eq!(h("numeric[]").as_deref(), Some("hashtextextended((c)::text, (-3)::int8)"));
        assert_eq!(h("jsonb").as_deref(), Some("hashtextextended((c)::text, (-3)::int8)"));
        assert_eq!(
            h("timestamp(3) with time zone").as_deref(),
            Some("timestamp_hash_extended(c AT TIME ZONE 'UTC', (-3)::int8)")
        );
        // No hash here: the record hash of the rest takes them.
        assert_eq!(h("date"), None);
        assert_eq!(h("json[]"), None);
        assert_eq!(h("integer[][]"), None);
    }

    #[test]
    fn position_constants_differ_and_are_wide() {
        let c: Vec<i64> = (0..64).map(super::position_constant).collect();
        assert!(c.iter().all(|x| x.unsigned_abs() > 1 << 40), "{c:?}");
        assert_eq!(c.iter().collect::<std::collections::BTreeSet<_>>().len(), c.len());
    }
}
