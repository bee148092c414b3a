//! `sessions list|get|delete|stats`: the seed's monitoring snippets as a real CLI.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use futures::TryStreamExt as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use super::UsageError;
use super::output::{self, OutputFormat, human_duration};
use crate::api::contract::env;
use crate::store::{
    self, DEFAULT_KEY_PREFIX, DEFAULT_TTL, Listed, MemorySample, RedisStore, RedisTarget,
    ScanReport, Session, SessionCounts, SessionId, SessionState, SessionStore,
};

/// Records fetched per `SCAN` page. Small: Redis counts a page's replies, waiting in its
/// output buffer, as used memory, and one at `maxmemory` evicts keys to hold them.
const PAGE_SIZE: usize = 100;
/// A scan shows its progress only once it has run this long (and only on a terminal).
const PROGRESS_AFTER: Duration = Duration::from_millis(300);
/// Records `stats` samples with `MEMORY USAGE`.
const MEMORY_SAMPLE: usize = 100;

/// Where the store is.
#[derive(Debug, Clone, Args)]
pub struct RedisArgs {
    /// Redis URL (redis://, rediss:// for TLS; comma-separated seed URLs for a Cluster).
    #[arg(
        long,
        global = true,
        env = env::REDIS_URL,
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
    /// Key prefix of session records.
    #[arg(long, global = true, env = env::KEY_PREFIX, default_value = DEFAULT_KEY_PREFIX)]
    pub key_prefix: String,
    /// The URL names a Redis Cluster node.
    #[arg(long, global = true, env = env::REDIS_CLUSTER)]
    pub redis_cluster: bool,
    /// PEM CA certificate to trust for rediss:// (default: the system roots).
    #[arg(long, global = true, env = env::REDIS_CA_FILE)]
    pub redis_ca_file: Option<PathBuf>,
}

impl RedisArgs {
    pub fn target(&self) -> anyhow::Result<RedisTarget> {
        let url = self.redis_url.as_deref().ok_or_else(|| {
            UsageError("no Redis URL: pass --redis-url or set MCP_SESSION_REDIS_URL".into())
        })?;
        let target = RedisTarget::parse(url)
            .map_err(|e| UsageError(e.to_string()))?
            .cluster(self.redis_cluster);
        Ok(match &self.redis_ca_file {
            Some(path) => target.with_ca_file(path)?,
            None => target,
        })
    }

    pub async fn connect(&self) -> anyhow::Result<RedisStore> {
        let target = self.target()?;
        store::redis::Keys::new(&self.key_prefix).map_err(|e| UsageError(e.to_string()))?;
        Ok(RedisStore::connect(target, &self.key_prefix, DEFAULT_TTL).await?)
    }
}

#[derive(Debug, Args)]
pub struct SessionsArgs {
    #[command(flatten)]
    redis: RedisArgs,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t)]
    output: OutputFormat,
    #[command(subcommand)]
    command: SessionsCommand,
}

#[derive(Debug, Subcommand)]
pub enum SessionsCommand {
    /// List sessions.
    List {
        /// Only sessions in this state.
        #[arg(long, value_parser = parse_state)]
        state: Option<SessionState>,
        /// Only sessions owned by this pod.
        #[arg(long)]
        pod: Option<String>,
        /// Stop after this many sessions.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Show one session.
    Get { id: String },
    /// Delete one session (and its index entries).
    Delete { id: String },
    /// Totals by state and by pod, age range, unreadable records, bytes per record.
    Stats,
}

fn parse_state(raw: &str) -> Result<SessionState, String> {
    raw.parse()
}

fn parse_id(raw: &str) -> anyhow::Result<SessionId> {
    SessionId::parse(raw).map_err(|e| UsageError(format!("invalid session id: {e}")).into())
}

pub async fn run(args: SessionsArgs) -> anyhow::Result<()> {
    // Usage errors before any connection attempt.
    if let SessionsCommand::Get { id } | SessionsCommand::Delete { id } = &args.command {
        parse_id(id)?;
    }
    let store = args.redis.connect().await?;
    let mut out = std::io::stdout().lock();
    match args.command {
        SessionsCommand::List { state, pod, limit } => {
            list(&store, args.output, Filter { state, pod, limit }, &mut out).await
        }
        SessionsCommand::Get { id } => get(&store, &parse_id(&id)?, args.output, &mut out).await,
        SessionsCommand::Delete { id } => {
            let id = parse_id(&id)?;
            anyhow::ensure!(store.delete(&id).await?, "session {id} not found");
            writeln!(out, "session {id} deleted")?;
            Ok(())
        }
        SessionsCommand::Stats => stats(&store, args.output, &mut out).await,
    }
}

struct Filter {
    state: Option<SessionState>,
    pod: Option<String>,
    limit: Option<usize>,
}

impl Filter {
    fn accepts(&self, session: &Session) -> bool {
        self.state.is_none_or(|s| session.record.state() == s)
            && self
                .pod
                .as_deref()
                .is_none_or(|p| session.record.owner_pod.as_deref() == Some(p))
    }
}

async fn list(
    store: &dyn SessionStore,
    format: OutputFormat,
    filter: Filter,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let progress = ScanProgress::new("listing sessions");
    let mut sessions = Vec::new();
    let mut items = std::pin::pin!(store::list_all(store, PAGE_SIZE));
    let mut seen = 0_u64;
    while let Some(item) = items.try_next().await? {
        seen += 1;
        progress.update(seen);
        match item {
            Listed::Session(session) if filter.accepts(&session) => sessions.push(session),
            Listed::Session(_) => {}
            Listed::Unreadable(unreadable) => {
                tracing::debug!(key = %unreadable.key, reason = %unreadable.reason, "skipped unreadable session record");
                progress.suspend(|| eprintln!("warning: skipped {unreadable}"));
            }
        }
        if filter.limit.is_some_and(|limit| sessions.len() >= limit) {
            break;
        }
    }
    progress.finish();
    sessions.sort_by_key(|s| s.record.created_at);
    if output::structured(format, &sessions, out)? {
        return Ok(());
    }
    let mut table = output::table(&[
        "id",
        "user",
        "created",
        "last activity",
        "ttl",
        "state",
        "pod",
    ]);
    for session in &sessions {
        let record = &session.record;
        table.add_row(vec![
            session.id.to_string(),
            record.user_id().unwrap_or("-").to_owned(),
            record.created_at.rfc3339(),
            record.last_activity_at.rfc3339(),
            session
                .ttl_millis
                .map_or_else(|| "none".into(), human_duration),
            record.state().to_string(),
            record.owner_pod.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    if sessions.is_empty() {
        writeln!(out, "No sessions found in {}.", store.describe())?;
    } else {
        output::write_table(&table, out)?;
    }
    Ok(())
}

async fn get(
    store: &dyn SessionStore,
    id: &SessionId,
    format: OutputFormat,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let session = store
        .get(id)
        .await?
        .with_context(|| format!("session {id} not found"))?;
    let format = if format == OutputFormat::Table {
        OutputFormat::Yaml
    } else {
        format
    };
    output::structured(format, &session, out)?;
    Ok(())
}

/// What `stats` prints. It reads and never writes (a full Redis refuses writes, an evicting
/// one evicts sessions to take them), so it reports the index as it stands, if there is one.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Stats {
    store: String,
    /// Always true: nothing was written.
    read_only: bool,
    /// From the sorted-set indexes; `None` where there are none yet (the operator builds them).
    indexed: Option<SessionCounts>,
    /// From a full scan of the records.
    scanned: SessionCounts,
    oldest_created: Option<String>,
    newest_created: Option<String>,
    unreadable: BTreeMap<&'static str, u64>,
    memory: Option<MemorySample>,
}

async fn stats(
    store: &dyn SessionStore,
    format: OutputFormat,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let progress = ScanProgress::new("scanning records");
    let (indexed, report): (Option<SessionCounts>, ScanReport) =
        store::audit(store, PAGE_SIZE, &|seen| progress.update(seen)).await?;
    progress.finish();
    let memory = store.memory_usage(MEMORY_SAMPLE).await?;
    let mut unreadable = BTreeMap::new();
    for record in &report.unreadable {
        *unreadable.entry(record.reason.kind()).or_default() += 1;
    }
    let stats = Stats {
        store: store.describe(),
        read_only: true,
        indexed,
        scanned: report.counts,
        oldest_created: report.oldest_created.map(|t| t.rfc3339()),
        newest_created: report.newest_created.map(|t| t.rfc3339()),
        unreadable,
        memory,
    };
    if output::structured(format, &stats, out)? {
        return Ok(());
    }
    writeln!(out, "Store:       {}", stats.store)?;
    writeln!(out)?;
    let mut table = output::table(&["", "index", "scan"]);
    /// A count of each state: total, active, draining.
    fn by_state(counts: &SessionCounts) -> [u64; 3] {
        [counts.total, counts.active, counts.draining]
    }
    let indexed = stats.indexed.as_ref().map(by_state);
    let scanned = by_state(&stats.scanned);
    for (row, name) in ["total", "active", "draining"].into_iter().enumerate() {
        table.add_row(vec![
            name.to_owned(),
            indexed.map_or_else(|| "-".to_owned(), |counts| counts[row].to_string()),
            scanned[row].to_string(),
        ]);
    }
    output::write_table(&table, out)?;
    writeln!(out)?;
    let no_pods = std::collections::BTreeMap::new();
    let indexed_pods = stats.indexed.as_ref().map_or(&no_pods, |c| &c.per_pod);
    if !stats.scanned.per_pod.is_empty() || !indexed_pods.is_empty() {
        let mut pods = output::table(&["pod", "index", "scan"]);
        let names: std::collections::BTreeSet<&String> = indexed_pods
            .keys()
            .chain(stats.scanned.per_pod.keys())
            .collect();
        for pod in names {
            let count = |c: &std::collections::BTreeMap<String, u64>| {
                c.get(pod).copied().unwrap_or(0).to_string()
            };
            pods.add_row(vec![
                pod.clone(),
                count(indexed_pods),
                count(&stats.scanned.per_pod),
            ]);
        }
        output::write_table(&pods, out)?;
        writeln!(out)?;
    }
    let or_dash = |t: &Option<String>| t.clone().unwrap_or_else(|| "-".into());
    writeln!(out, "Oldest:      {}", or_dash(&stats.oldest_created))?;
    writeln!(out, "Newest:      {}", or_dash(&stats.newest_created))?;
    let unreadable_total: u64 = stats.unreadable.values().sum();
    let detail: Vec<String> = stats
        .unreadable
        .iter()
        .map(|(k, n)| format!("{k}: {n}"))
        .collect();
    if unreadable_total == 0 {
        writeln!(out, "Unreadable:  0")?;
    } else {
        writeln!(
            out,
            "Unreadable:  {unreadable_total} ({})",
            detail.join(", ")
        )?;
    }
    if let Some(memory) = &stats.memory {
        writeln!(
            out,
            "Memory:      {} bytes per record (mean of {}, max {})",
            memory.mean_bytes, memory.sampled, memory.max_bytes
        )?;
    }
    match &stats.indexed {
        None => writeln!(
            out,
            "Index:       none yet; the operator builds it at its next count"
        )?,
        Some(indexed) if indexed.total > stats.scanned.total => writeln!(
            out,
            "Index:       {} entries of records that are gone (evicted, or deleted behind the index); the operator drops them at its next count",
            indexed.total - stats.scanned.total
        )?,
        Some(_) => {}
    }
    writeln!(out, "Read only:   nothing was written")?;
    Ok(())
}

/// A spinner on stderr for long scans: drawn only on a terminal, and only after a moment.
struct ScanProgress {
    bar: ProgressBar,
    started: Instant,
    shown: Mutex<bool>,
}

impl ScanProgress {
    fn new(what: &'static str) -> Self {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden());
        let style = ProgressStyle::with_template("{spinner} {msg}: {human_pos} keys, {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.set_message(what);
        Self {
            bar,
            started: Instant::now(),
            shown: Mutex::new(false),
        }
    }

    fn update(&self, seen: u64) {
        self.bar.set_position(seen);
        let mut shown = self.shown.lock().unwrap_or_else(|p| p.into_inner());
        if !*shown && self.started.elapsed() > PROGRESS_AFTER {
            // `stderr()` stays hidden when stderr is not a terminal.
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
            self.bar.enable_steady_tick(Duration::from_millis(120));
            *shown = true;
        }
    }

    fn suspend(&self, f: impl FnOnce()) {
        self.bar.suspend(f);
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
