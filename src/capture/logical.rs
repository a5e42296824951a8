//! Logical capture through the SQL interface: `pg_logical_slot_peek_binary_changes` with
//! pgoutput, keys stored on green, then `pg_replication_slot_advance`. Peek (not get) so that a
//! crash between reading and storing loses nothing.

use std::collections::HashMap;

use futures_util::TryStreamExt;
use tokio_postgres::Client;
use tracing::info;

use super::{
    pgoutput::{self, Message, Relation},
    KeyEvent, POLL_CHANGES,
};
use crate::{
    error::{Error, Result},
    pg::{ident, literal, ConnInfo, Lsn},
    plan::{KeyText, Plan, ResolvedPlan, ResolvedTable},
    state::State,
};

/// A logical slot and publication on blue.
pub struct Logical {
    /// Connection to blue (replaced after a reconnect).
    pub blue: Client,
    slot: String,
    tables: Vec<ResolvedTable>,
    /// Position (bytes) up to which every change is stored on green.
    captured: Lsn,
    /// Where blue is, for the second session (boxed: a connection config is large).
    info: Box<ConnInfo>,
    /// A second session on blue (visibility checks while `blue` streams a peek).
    watch: Option<Client>,
    /// Apply the keys of copied entries at once instead of storing them in pending (the
    /// follower; not the cutover, which tracks every key it applies).
    pub direct: bool,
    /// Keys applied that way so far.
    pub applied_directly: u64,
    /// Touched as a round moves (the follower's stall watch).
    pub progress: std::sync::Arc<crate::retry::Progress>,
    /// Sessions applying keys straight from capture.
    sessions: DirectSessions,
    /// A verify has started, so keys applied directly are recorded as touched (read again
    /// before each chunk until it is true; it never goes back).
    verify_started: bool,
    /// The last round stopped at its cap ([`POLL_CHANGES`] messages): more is waiting.
    full: bool,
}

impl Logical {
    /// Creates the publication (exactly the planned tables) and the slot, unless they exist.
    pub async fn setup(plan: &Plan, resolved: &ResolvedPlan, blue: Client) -> Result<Self> {
        let slot = super::object_name(&plan.name);
        // Each source and joined table once, however many entries read it.
        let mut tables: Vec<String> = resolved
            .tables
            .iter()
            .flat_map(|t| std::iter::once(t.source.quoted()).chain(t.joins.iter().map(|j| j.table.quoted())))
            .collect();
        tables.sort();
        tables.dedup();
        let has_pub: bool = blue
            .query_one("SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = $1)", &[&slot])
            .await
            .map_err(Error::db("blue: looking for the publication"))?
            .get(0);
        // A partitioned table's changes are published as the partitioned table's (whichever
        // partition holds the row, partitions created later included), so they reach its entry.
        if has_pub {
            // Keep it listing exactly the planned tables, even if the plan changed.
            blue.batch_execute(&format!(
                "ALTER PUBLICATION {p} SET TABLE {}; ALTER PUBLICATION {p} SET (publish_via_partition_root = true)",
                tables.join(", "),
                p = ident(&slot)
            ))
            .await
            .map_err(Error::db("blue: updating the publication"))?;
        } else {
            blue.batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
                ident(&slot),
                tables.join(", ")
            ))
            .await
            .map_err(Error::db("blue: creating the publication"))?;
        }
        let captured = match confirmed_position(&blue, &slot).await? {
            Some(position) => position,
            None => {
                // Waits for transactions running now to finish, so that every later commit is
                // decoded; the copy snapshot is taken after this returns. A prepared (2PC) or
                // forgotten transaction makes that wait last: say which, and how to end it.
                let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&slot];
                let create = blue.query_one(
                    "SELECT (lsn - '0/0')::int8 FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &params,
                );
                let row = while_waiting(plan, create, "creating the replication slot")
                    .await?
                    .map_err(Error::db("blue: creating the replication slot"))?;
                let lsn: Lsn = row.get(0);
                info!(slot = %slot, lsn = %lsn, "replication slot created");
                lsn
            }
        };
        Ok(Self::new(plan, resolved, blue, slot, captured))
    }

    fn new(plan: &Plan, resolved: &ResolvedPlan, blue: Client, slot: String, captured: Lsn) -> Self {
        Self {
            blue,
            slot,
            tables: resolved.tables.clone(),
            captured,
            info: Box::new(plan.blue.clone()),
            watch: None,
            direct: false,
            applied_directly: 0,
            progress: Default::default(),
            sessions: DirectSessions::new(plan),
            verify_started: false,
            full: false,
        }
    }

    /// The slot `copy` created, without touching the publication; `None` when there is no slot.
    pub async fn open(plan: &Plan, resolved: &ResolvedPlan, blue: Client) -> Result<Option<Self>> {
        let slot = super::object_name(&plan.name);
        let position = confirmed_position(&blue, &slot).await?;
        Ok(position.map(|captured| Self::new(plan, resolved, blue, slot, captured)))
    }

    /// Whether the last round stopped at its cap, with more waiting on blue.
    pub fn full(&self) -> bool {
        self.full
    }

    /// Position up to which changes are stored on green.
    pub fn captured_lsn(&self) -> Lsn {
        self.captured
    }

    /// Blue's WAL flush position. Decoding reads only up to the flush position, so this (not the
    /// write position, which runs ahead under `synchronous_commit = off`) is what a peek that
    /// returned nothing proves captured.
    pub async fn current_lsn(&self) -> Result<Lsn> {
        crate::pg::flush_lsn(&self.blue).await
    }

    /// A position every transaction committed so far on blue lies before; see [`crate::pg::commit_point`].
    pub async fn committed_lsn(&self) -> Result<Lsn> {
        crate::pg::commit_point(&self.blue).await
    }

    /// Gives up the sessions besides `blue` (a reconnect after a stall must not reuse a hung
    /// one), cancelling what they still run ([`ConnInfo::abandon`]).
    pub fn reset_sessions(&mut self) {
        self.sessions.blue.abandon(self.watch.take());
        self.sessions.reset();
    }

    /// One capture round; see [`super::Capture::poll`]. The peeked changes are streamed, not
    /// collected: keys are stored on green in chunks of [`STORE_CHUNK`] as they come (apply
    /// starts on them at once), so memory stays bounded whatever the size of a transaction.
    /// The position is stored, and the slot advanced, only once the whole peek is stored: a
    /// crash in between stores some keys twice, which apply does not mind.
    pub async fn poll(&mut self, green: &mut Client, state: &State) -> Result<usize> {
        let started = std::time::Instant::now();
        let now = self.current_lsn().await?;
        let direct: Vec<crate::state::TableId> =
            if self.direct { state.done_tables(&*green).await? } else { Vec::new() };
        let sql = format!(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, \
             'proto_version', '1', 'publication_names', {})",
            literal(&self.slot)
        );
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&self.slot, &POLL_CHANGES];
        let rows = self
            .blue
            .query_raw(&sql, params.iter().copied())
            .await
            .map_err(Error::db("blue: reading the replication slot"))?;
        futures_util::pin_mut!(rows);
        let mut decoder = Decoder::new(&self.tables);
        let (watch, info, applied, sessions, verify_started) =
            (&mut self.watch, &self.info, &mut self.applied_directly, &mut self.sessions, &mut self.verify_started);
        let (mut messages, mut stored, mut xids) = (0usize, 0usize, Vec::new());
        let progress = std::sync::Arc::clone(&self.progress);
        while let Some(row) = rows.try_next().await.map_err(Error::db("blue: reading the replication slot"))? {
            messages += 1;
            if messages % 1000 == 0 {
                progress.touch();
            }
            xids.extend(decoder.feed(row.get::<_, &[u8]>(0))?);
            if decoder.ready.len() + decoder.links.len() + decoder.in_tx.len() >= STORE_CHUNK {
                // Keys of the open transaction may be stored before its commit message arrives,
                // and apply re-reads them from blue at once: wait until blue shows the commits.
                let session = second_session(watch, info).await?;
                wait_visible(session, &xids).await?;
                xids.clear();
                decoder.release_open_transaction();
                let mut chunk = std::mem::take(&mut decoder.ready);
                let links = std::mem::take(&mut decoder.links);
                chunk.extend(super::trace::resolve(session, &self.tables, links, KeyText::Output).await?);
                stored += chunk.len();
                let to = Delivery { tables: &self.tables, direct: &direct, verify_started };
                *applied += deliver(sessions, green, state, to, chunk).await? as u64;
                progress.touch();
            }
        }
        wait_visible(&self.blue, &xids).await?;
        self.full = messages >= POLL_CHANGES as usize;
        let mut events = std::mem::take(&mut decoder.ready);
        let links = std::mem::take(&mut decoder.links);
        events.extend(super::trace::resolve(&self.blue, &self.tables, links, KeyText::Output).await?);
        stored += events.len();
        if !events.is_empty() {
            let to = Delivery { tables: &self.tables, direct: &direct, verify_started: &mut self.verify_started };
            self.applied_directly += deliver(&mut self.sessions, green, state, to, events).await? as u64;
        }
        // A peek not cut at its cap read every commit before `now` (it reads to the flush
        // position when it starts), so `now` is captured even when the last change decoded lies
        // far before it: other databases' and unpublished tables' WAL is behind us too, and a
        // position left at our last commit showed that WAL as lag.
        let read_all = if self.full { None } else { Some(now) };
        let position = decoder.end.max(read_all).unwrap_or(self.captured).max(self.captured);
        state.set_capture_lsn(&*green, position).await?;
        if stored > 0 {
            tracing::debug!(messages, stored, ms = started.elapsed().as_millis() as u64, "captured");
        }
        crate::fault::point("capture.stored").await;
        if position > self.captured {
            self.blue
                .execute(
                    "SELECT pg_replication_slot_advance($1, '0/0'::pg_lsn + ($2::int8)::numeric)",
                    &[&self.slot, &position],
                )
                .await
                .map_err(Error::db("blue: advancing the replication slot"))?;
            self.captured = position;
        }
        Ok(stored)
    }
}

/// Where [`deliver`] sends a chunk of keys.
struct Delivery<'a> {
    tables: &'a [ResolvedTable],
    /// Entries applied at once.
    direct: &'a [crate::state::TableId],
    /// See [`Logical::verify_started`].
    verify_started: &'a mut bool,
}

/// Hands captured keys on: applied at once for the entries in `direct` (copied, and this is
/// the follower), each session its own share of the keys, stored in pending for the others.
/// Returns how many were applied.
async fn deliver(
    sessions: &mut DirectSessions,
    green: &mut Client,
    state: &State,
    to: Delivery<'_>,
    events: Vec<KeyEvent>,
) -> Result<usize> {
    let Delivery { tables, direct, verify_started } = to;
    let (now, later): (Vec<KeyEvent>, Vec<KeyEvent>) = events.into_iter().partition(|e| direct.contains(&e.table));
    state.store_keys(&*green, &later).await?;
    if now.is_empty() {
        return Ok(0);
    }
    // Read after the chunk was decoded: when no verify has started yet, every change in it lies
    // before the position of any verify that starts later, which covers it (no need to record
    // the keys as touched; recording was half of a burst's apply time).
    if !*verify_started {
        *verify_started = state.verify_started(&*green).await?;
    }
    let record = *verify_started;
    let sessions = sessions.ready().await?;
    let mut applied = 0;
    for t in tables.iter().filter(|t| direct.contains(&t.id)) {
        let mut shares: Vec<Vec<KeyEvent>> = vec![Vec::new(); sessions.len()];
        for e in now.iter().filter(|e| e.table == t.id) {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hash::hash(&e.key, &mut h);
            shares[(std::hash::Hasher::finish(&h) % sessions.len() as u64) as usize].push(e.clone());
        }
        let work = sessions
            .iter_mut()
            .zip(&shares)
            .filter(|(_, share)| !share.is_empty())
            .map(|((blue, green), share)| crate::apply::apply_direct(blue, green, state, t, share, record));
        match futures_util::future::try_join_all(work).await {
            Ok(n) => applied += n.into_iter().sum::<usize>(),
            // Shares can collide on green: keys that differ as text but compare equal (citext)
            // write one row and can deadlock; a unique value moved on blue from one key to
            // another is inserted by one share before the other deletes it. Applying is
            // idempotent, so the table's part of the chunk is applied again in one transaction
            // (deletes before upserts).
            Err(e) if crate::retry::retry_later(&e) && !crate::retry::connection_lost(&e) => {
                tracing::info!(error = %e, table = %t.target, "applying a chunk in shares failed; applying it in one transaction");
                let (blue, green) = &mut sessions[0];
                applied += crate::apply::apply_direct(blue, green, state, t, &shares.concat(), record).await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(applied)
}

/// Blue and green sessions that apply keys straight from capture, one share of each chunk per
/// pair (`[capture] apply_workers` of them), opened when first needed and again when broken.
pub struct DirectSessions {
    blue: Box<ConnInfo>,
    green: Box<ConnInfo>,
    count: usize,
    open: Vec<(Client, Client)>,
}

impl DirectSessions {
    /// Gives up the open sessions (after a stall: one may hang without being closed),
    /// cancelling what they still run.
    fn reset(&mut self) {
        for (blue, green) in self.open.drain(..) {
            self.blue.abandon([blue]);
            self.green.abandon([green]);
        }
    }

    fn new(plan: &Plan) -> Self {
        Self {
            blue: Box::new(plan.blue.clone()),
            green: Box::new(plan.green.clone()),
            count: plan.apply_workers.max(1),
            open: Vec::new(),
        }
    }

    async fn ready(&mut self) -> Result<&mut [(Client, Client)]> {
        self.open.retain(|(b, g)| !b.is_closed() && !g.is_closed());
        while self.open.len() < self.count {
            let green = self.green.connect().await?;
            crate::apply::prepare_green(&green).await?;
            self.open.push((self.blue.connect().await?, green));
        }
        Ok(&mut self.open)
    }
}

/// A second session on blue, for visibility checks while the first streams a peek.
async fn second_session<'a>(watch: &'a mut Option<Client>, info: &ConnInfo) -> Result<&'a Client> {
    if watch.as_ref().is_none_or(Client::is_closed) {
        *watch = Some(info.connect().await?);
    }
    watch.as_ref().ok_or(Error::Internal("no blue session for visibility checks"))
}

/// Keys stored per green statement while a peek streams: bounds memory (a million-row
/// transaction once held 750 MB) and lets apply start before a large transaction is all read.
pub const STORE_CHUNK: usize = 50_000;

/// How an entry reads a table: as its driving table, or as one of its joins.
#[derive(Debug, Clone, Copy)]
struct Role {
    /// Entry index.
    entry: usize,
    /// Join index, for a joined table.
    join: Option<usize>,
}

/// The roles of table `schema.name` among `tables`.
fn roles(tables: &[ResolvedTable], schema: &str, name: &str) -> Vec<Role> {
    let mut out = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        if t.source.schema == schema && t.source.name == name {
            out.push(Role { entry: i, join: None });
        }
        for (j, join) in t.joins.iter().enumerate() {
            if join.table.schema == schema && join.table.name == name {
                out.push(Role { entry: i, join: Some(j) });
            }
        }
    }
    out
}

/// Turns pgoutput messages into key events, one message at a time.
struct Decoder<'a> {
    tables: &'a [ResolvedTable],
    /// Relation id → how entries read it and its columns.
    relations: HashMap<u32, (Vec<Role>, Relation)>,
    /// Keys (driving table) and link values (joined table) of the open transaction.
    in_tx: Vec<(Role, Vec<String>)>,
    /// The open transaction's commit record position.
    final_lsn: Option<Lsn>,
    /// Events ready to store.
    ready: Vec<KeyEvent>,
    /// Link values of joined tables' writes, ready to trace.
    links: Vec<super::trace::Link>,
    /// The end of the last commit.
    end: Option<Lsn>,
}

impl<'a> Decoder<'a> {
    fn new(tables: &'a [ResolvedTable]) -> Self {
        Self {
            tables,
            relations: HashMap::new(),
            in_tx: Vec::new(),
            final_lsn: None,
            ready: Vec::new(),
            links: Vec::new(),
            end: None,
        }
    }

    /// Decodes one message. Returns the transaction id when a transaction begins.
    fn feed(&mut self, data: &[u8]) -> Result<Option<u32>> {
        let message =
            pgoutput::decode(data).map_err(|e| Error::Decode { what: "pgoutput".into(), message: e.to_string() })?;
        match message {
            Message::Relation(rel) => {
                let roles = roles(self.tables, &rel.namespace, &rel.name);
                if let Some(&r) = roles.first() {
                    check_shape(&self.tables[r.entry], r.join, &rel)?;
                    self.relations.insert(rel.relid, (roles, rel));
                }
            }
            Message::Change { relid, new, old } => {
                let Some((roles, rel)) = self.relations.get(&relid) else { return Ok(None) };
                // Every entry reading the table gets the change: by its key where it drives the
                // entry, by its link values where it is joined.
                for &r in roles {
                    let t = &self.tables[r.entry];
                    let columns: Vec<String> = match r.join {
                        None => t.key.iter().map(|k| k.source.clone()).collect(),
                        Some(j) => t.joins[j].link_columns(),
                    };
                    for tuple in [&new, &old].into_iter().flatten() {
                        // A key is missing only when it is an unchanged TOASTed value of an
                        // update's new row; the key did not change then, and the old row is not
                        // sent. Link values are also missing where NULL: such a row joins
                        // nothing.
                        if let Some(key) = pgoutput::key_of(rel, &columns, tuple) {
                            self.in_tx.push((r, key));
                        }
                    }
                }
            }
            Message::Truncate { relids } => {
                let names: Vec<String> = relids
                    .iter()
                    .filter_map(|r| self.relations.get(r))
                    .map(|(_, rel)| format!("{}.{}", rel.namespace, rel.name))
                    .collect();
                return Err(super::truncated(&names));
            }
            Message::Commit { end_lsn } => {
                let lsn = Lsn(end_lsn as i64);
                self.release(lsn);
                self.final_lsn = None;
                self.end = Some(lsn);
            }
            Message::Begin { final_lsn, xid } => {
                self.final_lsn = Some(Lsn(final_lsn as i64));
                return Ok(Some(xid));
            }
            Message::Other => {}
        }
        Ok(None)
    }

    /// Moves the open transaction's keys so far to the ready events, at its commit record's
    /// position (its end is not known before the commit message; the start is no later, so
    /// "pending at or below a position" only errs on the side of waiting).
    fn release_open_transaction(&mut self) {
        if let Some(lsn) = self.final_lsn {
            self.release(lsn);
        }
    }

    fn release(&mut self, lsn: Lsn) {
        for (r, values) in self.in_tx.drain(..) {
            match r.join {
                None => self.ready.push(KeyEvent { table: self.tables[r.entry].id.clone(), key: values, lsn }),
                Some(join) => self.links.push(super::trace::Link { entry: r.entry, join, values, lsn }),
            }
        }
    }
}

/// How often a wait on blue's open transactions is reported.
const REPORT_WAIT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs `fut` (a statement on blue that waits for the transactions running on blue to end), and
/// every few seconds until it returns logs which transactions it is waiting for.
async fn while_waiting<T>(plan: &Plan, fut: impl std::future::Future<Output = T>, what: &str) -> Result<T> {
    tokio::pin!(fut);
    let mut watcher = None;
    loop {
        tokio::select! {
            r = &mut fut => return Ok(r),
            _ = tokio::time::sleep(REPORT_WAIT_EVERY) => {
                if watcher.is_none() {
                    watcher = Some(plan.blue.connect().await?);
                }
                let Some(w) = &watcher else { continue };
                let open = crate::pg::catalog::open_transactions(w).await.unwrap_or_default();
                if open.is_empty() {
                    tracing::warn!("blue: {what} is waiting for transactions on blue to end");
                }
                for t in open {
                    tracing::warn!("blue: {what} is waiting for a transaction to end: {t}");
                }
            }
        }
    }
}

/// How long a decoded commit may stay invisible before capture gives up on this round.
const VISIBLE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits until every transaction in `xids` is visible to new snapshots on blue.
///
/// A commit record reaches the WAL (and so decoding) before the committing backend leaves the
/// proc array; until it does, other sessions still see the old row. Apply re-reads keys from
/// blue, so a key stored before its transaction is visible could be applied with the old row
/// and then dropped from pending: the change would be lost. Under load the window is real (a
/// backend descheduled between the two steps). Keys are therefore stored only after this.
async fn wait_visible(blue: &Client, xids: &[u32]) -> Result<()> {
    if xids.is_empty() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    loop {
        let snapshot: String = blue
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await
            .map_err(Error::db("blue: reading the current snapshot"))?
            .get(0);
        if all_visible(&snapshot, xids) {
            return Ok(());
        }
        if started.elapsed() > VISIBLE_WAIT {
            return Err(Error::NotVisible { waited: VISIBLE_WAIT, snapshot });
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Whether every 32-bit transaction id in `xids` (each of a committed transaction) is visible in
/// `snapshot` (`xmin:xmax:xip,...` with 64-bit ids): below xmax and not listed as running.
fn all_visible(snapshot: &str, xids: &[u32]) -> bool {
    let mut parts = snapshot.split(':');
    let (Some(_), Some(xmax), Some(xip)) = (parts.next(), parts.next(), parts.next()) else { return false };
    let Ok(xmax) = xmax.parse::<u64>() else { return false };
    let running: Vec<u64> = xip.split(',').filter_map(|x| x.parse().ok()).collect();
    xids.iter().all(|&x| {
        // The 64-bit id: xmax's epoch, or the one before when the low bits wrapped since.
        let mut full = (xmax & !0xFFFF_FFFF) | u64::from(x);
        if full >= xmax && full >= 1 << 32 {
            full -= 1 << 32;
        }
        full < xmax && !running.contains(&full)
    })
}

/// The position the slot has confirmed (everything before it is stored on green); `None` when
/// there is no slot.
async fn confirmed_position(blue: &Client, slot: &str) -> Result<Option<Lsn>> {
    Ok(blue
        .query_opt(
            "SELECT (confirmed_flush_lsn - '0/0')::int8 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(Error::db("blue: looking for the replication slot"))?
        .map(|r| r.get::<_, Option<Lsn>>(0).unwrap_or_default()))
}

/// Stops following when blue's table (entry `t`'s source, or its join `join`) no longer has the
/// columns the plan was resolved against.
fn check_shape(t: &ResolvedTable, join: Option<usize>, rel: &Relation) -> Result<()> {
    let (table, columns) = match join {
        None => (&t.source, &t.source_columns),
        Some(j) => (&t.joins[j].table, &t.joins[j].columns),
    };
    if &rel.columns == columns {
        return Ok(());
    }
    let was: Vec<String> = columns.iter().map(|(n, _)| n.clone()).collect();
    let now: Vec<String> = rel.columns.iter().map(|(n, _)| n.clone()).collect();
    Err(Error::SchemaChanged { table: table.to_string(), was, now })
}

/// How long cleanup waits for a session still holding the slot to let it go.
const SLOT_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Drops the slot and publication (cleanup).
pub async fn drop_objects(blue: &Client, plan: &str) -> Result<()> {
    let slot = super::object_name(plan);
    // The session of a `copy` that just died holds the slot until blue notices: wait a little.
    let holder = || async {
        Ok::<Option<i32>, Error>(
            blue.query_opt("SELECT active_pid FROM pg_catalog.pg_replication_slots WHERE slot_name = $1", &[&slot])
                .await
                .map_err(Error::db("blue: looking for the replication slot"))?
                .and_then(|r| r.get(0)),
        )
    };
    if !crate::retry::wait_until(SLOT_RELEASE_WAIT, || async { Ok(holder().await?.is_none()) }).await? {
        if let Some(pid) = holder().await? {
            return Err(Error::SlotInUse { slot: slot.to_string(), pid });
        }
    }
    blue.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .map_err(Error::db(format!("blue: dropping slot {slot}")))?;
    blue.batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", ident(&slot)))
        .await
        .map_err(Error::db("blue: dropping the publication"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::all_visible;

    #[test]
    fn visibility_of_committed_transactions() {
        assert!(all_visible("100:105:", &[99, 104]));
        assert!(!all_visible("100:105:102", &[102]));
        assert!(!all_visible("100:105:", &[105]));
        // Ids carry the epoch: 2^32 + 7 is xid 7 of epoch 1.
        let e1 = (1u64 << 32) + 10;
        assert!(all_visible(&format!("{e1}:{e1}:"), &[7, u32::MAX]));
        assert!(!all_visible(&format!("{}:{e1}:{}", e1 - 5, e1 - 3), &[7]));
    }
}
